"""Pretraining on a real local Ray cluster: TorchTrainer (Train V2) + DeepSpeed ZeRO-2 on CPU/gloo,
two workers, Ray Data from the Parquet shards; resume after SIGKILL, after a failed run, and
after a finished one; and the bad-input errors of the job's front door."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from biglearn import cli
from biglearn.data.digits import ensure_digits
from biglearn.data.manifest import MISSING, read_manifest, read_split
from biglearn.export import load_export
from biglearn.generation import complete
from biglearn.roles import ABSENT, SOURCE, TARGET
from biglearn.train.ingest import micro_batches
from biglearn.train.ownership import RunLease
from biglearn.train.run import PretrainError, pretrain, shard_dataset
from tests.integration.conftest import metrics_history
from tests.integration.conftest import tiny_config as tiny

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ray


def logged(run_folder: str, key: str) -> list:
    return [record[key] for record in metrics_history(run_folder)]


def logged_steps(run_folder: str) -> list[int]:
    return logged(run_folder, "step")


def test_sigkilled_worker_is_restarted_from_last_checkpoint_and_ends_as_an_uninterrupted_run(
    ray_cluster, digits, tmp_path
):
    # Two micro-steps per optimizer step, one task per global batch held for 2 steps.
    same = [
        "eval.guidance=1.0",
        "model.retrieval_neighbours=3",
        "optim.grad_accum=2",
        "schedule.granularity=batch",
        "schedule.inner_steps=2",
        "eval.panel_examples=4",
    ]
    straight = pretrain(tiny(digits, tmp_path, "straight", *same))
    cfg = tiny(
        digits, tmp_path, "killed", *same, "cluster.max_failures=1", "train.faults=[{kind: kill, step: 7, rank: 1}]"
    )
    outcome = pretrain(cfg)

    assert (tmp_path / "killed" / "faults" / "kill-rank1-step7").exists(), "the fault never fired"
    assert outcome.summary["train"] == {"final_step": 12, "resumes": [4]}
    # Steps 5-6 ran twice in wall time, but the run's history has each step exactly once.
    assert logged_steps(outcome.run_folder) == list(range(1, 13))
    # ... and the restart saw the same weights, optimizer, tasks and data as the run without it.
    assert logged(outcome.run_folder, "loss") == logged(straight.run_folder, "loss")
    # The model FLOPs of each window are counted from the tasks, so they repeat too; MFU is a share.
    assert logged(outcome.run_folder, "flops") == logged(straight.run_folder, "flops")
    assert all(0 < mfu < 1 for mfu in logged(outcome.run_folder, "mfu"))
    # One task per global batch (both micro-batches, both ranks), held for inner_steps=2 steps.
    families = [sorted(record) for record in logged(outcome.run_folder, "families")]
    assert all(len(names) == 1 for names in families) and families[0::2] == families[1::2]
    assert len({names[0] for names in families}) > 1, "the task changes between inner-step pairs"
    resumed, uninterrupted = (load_file(Path(run.export) / "model.safetensors") for run in (outcome, straight))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], weights) for name, weights in uninterrupted.items())

    export = Path(outcome.export)
    model, spec = load_export(export)
    assert spec.length == 64 and spec.vocab_size == 17 and spec.grid == (8, 8)
    training_split = torch.from_numpy(read_split(digits, read_manifest(digits), "train")["values"])
    assert spec.memory_rows == len(training_split) and torch.equal(model.memory.examples, training_split.long())
    assert json.loads((export / "manifest.json").read_text())["name"] == "digits"
    assert json.loads((export / "config.json").read_text())["run"]["name"] == "killed"
    panel = json.loads((export / "panel.json").read_text())["panel_nll"]
    assert {"joint", "bottom_half", "random_50"} <= set(panel)
    assert all(0 < v < 10 for v in panel.values())
    quality = json.loads((export / "panel.json").read_text())["quality"]
    assert {
        "completion_accuracy",
        "completion_accuracy_first_draw",
        "completion_accuracy_unguided",
        "joint_top_class_probability",
    } <= set(quality)
    assert quality["conditional"]["draws_per_input"] == 2 and quality["joint"]["samples"] == 4
    assert {"mmd", "mmd_reference"} <= set(quality["marginal_left_half"])
    assert spec.carries_training_data and json.loads((export / "model.json").read_text())["carries_training_data"]
    assert (Path(outcome.run_folder) / "completions.png").stat().st_size > 0
    with torch.no_grad():
        logits = model(torch.zeros(1, 64, dtype=torch.long), torch.full((1, 64), 2, dtype=torch.int8))
    assert torch.isfinite(logits).all()


def test_failed_run_keeps_last_checkpoint_and_rerun_resumes(ray_cluster, digits, tmp_path, capsys):
    failing = tiny(
        digits, tmp_path, "nan", "train.faults=[{kind: nan_loss, step: 10, rank: 0}]", "train.tracker=tensorboard"
    )
    with pytest.raises(PretrainError) as failure:
        pretrain(failing)
    message = str(failure.value)
    assert "non-finite loss" in message and "step 10" in message and "step 8" in message
    # The history is written as the run goes: the failed run keeps every step it logged.
    assert logged_steps(str(tmp_path / "nan")) == list(range(1, 10))

    # The same command again (same run name): resumes from step 8 instead of starting over.
    outcome = pretrain(tiny(digits, tmp_path, "nan", "train.tracker=tensorboard"))
    assert outcome.summary["train"] == {"final_step": 12, "resumes": [8]}
    assert logged_steps(outcome.run_folder) == list(range(1, 13))
    # TensorBoard got the same records: the failed attempt's steps 1-9, then the resumed one's
    # 9-12 after a marker that tells TensorBoard to drop the first attempt's step 9.
    attempts = [tensorboard_scalars(path) for path in sorted((tmp_path / "nan" / "tensorboard").iterdir())]
    assert [sorted({step for tag, step in events if tag == "loss"}) for events in attempts] == [
        list(range(1, 10)),
        list(range(9, 13)),
    ]
    assert {"loss", "lr", "samples_per_s", "tflops", "mfu"} <= {tag for tag, _ in attempts[0]}
    assert any(tag.startswith("loss_by_family/") for tag, _ in attempts[0])

    # Once more, now that it is finished: the state comes from the final checkpoint (a fresh
    # start would show no resumes) and nothing is retrained.
    again = pretrain(tiny(digits, tmp_path, "nan"))
    assert again.summary["train"] == {"final_step": 12, "resumes": [8]}
    assert logged_steps(again.run_folder) == list(range(1, 13))


def tensorboard_scalars(path: Path) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in a TensorBoard event file (TFRecord framing: length, CRC,
    an Event message, CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, offset, scalars = path.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        scalars += [(value.tag, event.step) for value in event.summary.value]
        offset += 12 + length + 4
    return scalars


def test_micro_batches_cut_from_larger_ray_data_batches(ray_cluster):
    import ray.data

    dataset = ray.data.from_items([{"values": [row, row]} for row in range(1000)], override_num_blocks=7)
    cpu = torch.device("cpu")
    ordered = list(micro_batches(dataset, 64, 300, None, None, cpu))  # fetches of 256 rows: 4 cut each
    assert [len(batch) for batch in ordered] == [64] * 15  # 1000 // 64; the partial tail is dropped
    assert torch.cat(ordered)[:, 0].tolist() == list(range(960))

    def shuffled(seed):
        return torch.cat(list(micro_batches(dataset, 64, 300, 500, seed, cpu)))[:, 0].tolist()

    first = shuffled(1)
    assert len(first) == 960 == len(set(first)) and first != list(range(960))
    assert first == shuffled(1) and first != shuffled(2)


def test_shards_are_read_in_blocks_of_bounded_size(ray_cluster, digits):
    """Ray Data would pack the digits' 3 training shards into one block; a worker holds a block."""
    manifest = read_manifest(digits)
    blocks = shard_dataset(digits, manifest, "train", block_bytes=16 * 2**10).materialize()
    assert blocks.count() == manifest.rows("train") and blocks.num_blocks() >= 4
    assert shard_dataset(digits, manifest, "train", block_bytes=2**30).materialize().num_blocks() < blocks.num_blocks()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.widht=64"], ["unknown key 'model.widht'", "d_model", "num_layers"]),
        (["train.steps=many"], ["train.steps", "'many'"]),
        (["data.path=/nonexistent/digits"], ["/nonexistent/digits", "does not exist"]),
        (["run.storage=/dev/null/runs"], ["cannot create the run folder /dev/null/runs", "run.storage"]),
    ],
)
def test_bad_input_is_refused_before_training(overrides, expected, capsys):
    args = [arg for item in overrides for arg in ("--set", item)]
    assert cli.pretrain(args) == 2
    err = capsys.readouterr().err
    for fragment in expected:
        assert fragment in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "embedded, option, expected",
    [
        ("digits-patches", "eval.guidance=1", "eval.guidance applies only to decoding token models"),
        (
            "digits",
            "model.retrieval_neighbours=2000",
            "it has 1437 rows of 64 x 1: set model.retrieval_neighbours to 0",
        ),
    ],
)
def test_options_the_data_cannot_take_are_refused_before_training(tmp_path, capsys, embedded, option, expected):
    args = [
        "--set",
        f"data.embedded_root={tmp_path / 'data'}",
        "--set",
        f"data.embedded={embedded}",
        "--set",
        option,
        "--set",
        f"run.storage={tmp_path / 'runs'}",
    ]
    assert cli.pretrain(args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_data_path_is_read_and_never_written(tmp_path, capsys):
    """data.path names a dataset to read: at a partial one (shards, an empty _receipts/, a foreign
    shard) the run is refused and nothing there is touched; the embedded digits are written only
    to their own folder, and not over files that are not theirs."""
    partial = tmp_path / "partial"
    ensure_digits(str(partial))
    (partial / "manifest.json").unlink()
    (partial / "train-00007.parquet").write_bytes(b"someone else's shard")
    (partial / "_receipts").mkdir()
    before = {p: p.read_bytes() for p in partial.rglob("*") if p.is_file()}
    storage = f"run.storage={tmp_path / 'runs'}"
    assert cli.pretrain(["--set", f"data.path={partial}", "--set", storage]) == 2
    err = capsys.readouterr().err
    assert f"{partial} has no manifest.json" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in partial.rglob("*") if p.is_file()} == before and (partial / "_receipts").is_dir()

    crowded = tmp_path / "embedded" / "digits"
    crowded.mkdir(parents=True)
    (crowded / "notes.txt").write_text("mine")
    assert cli.pretrain(["--set", f"data.embedded_root={crowded.parent}", "--set", storage]) == 2
    err = capsys.readouterr().err
    assert "holds files that no biglearn conversion wrote (notes.txt)" in err
    assert [p.name for p in crowded.iterdir()] == ["notes.txt"] and not (tmp_path / "runs").exists()


def test_a_run_is_owned_by_one_process_and_a_killed_owner_is_succeeded(digits, tmp_path, capsys):
    storage = tmp_path / "runs"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom biglearn.train.ownership import RunLease\n"
            f"with RunLease({str(storage / 'G')!r}):\n    print('held', flush=True)\n    time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["--set", f"data.path={digits}", "--set", f"run.storage={storage}", "--set", "run.name=G"]
        assert cli.pretrain(args) == 2
        err = capsys.readouterr().err
        assert (
            f"run folder {storage / 'G'} is in use" in err and f"pid {holder.pid}" in err and "another run.name" in err
        )
        assert sorted(p.name for p in (storage / "G").iterdir()) == [".lease"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    with RunLease(str(storage / "G")):  # a killed holder's lease passes to its successor at once
        pass


def test_a_csv_with_missing_cells_trains_from_the_command_line_and_imputes(ray_cluster, tmp_path):
    """Iris with 30% of its cells missing (no complete row needed): prepared and trained by the
    jobs with the table recipe, then the species of validation rows filled from their other
    observed cells, well above the most frequent species' share."""
    from sklearn.datasets import load_iris

    iris, rng = load_iris(), np.random.default_rng(0)
    lines = ["sepal_length,sepal_width,petal_length,petal_width,species"]
    for x, y in zip(iris.data, iris.target):
        lines.append(",".join("" if rng.random() < 0.3 else str(v) for v in [*x, iris.target_names[y]]))
    (tmp_path / "iris.csv").write_text("\n".join(lines) + "\n")
    data = tmp_path / "iris"
    assert (
        cli.prepare(
            [
                "--set",
                "source.kind=table",
                "--set",
                f"source.files={tmp_path / 'iris.csv'}",
                "--set",
                "source.bins=8",
                "--set",
                f"output={data}",
                "--set",
                "validation_fraction=0.3",
            ]
        )
        == 0
    )
    settings = [
        f"data.path={data}",
        f"run.storage={tmp_path / 'runs'}",
        "run.name=iris",
        "model.d_model=64",
        "model.num_layers=2",
        "model.num_heads=2",
        "optim.batch_size=32",
        "optim.lr=3e-3",
        "optim.warmup_steps=20",
        "train.steps=300",
        "train.log_every=50",
        "cluster.torch_threads=1",
        "eval.panel_steps=2",
    ]
    config = str(REPO / "biglearn" / "recipes" / "table.yaml")
    assert cli.pretrain(["--config", config, *[arg for item in settings for arg in ("--set", item)]]) == 0

    model, spec = load_export(tmp_path / "runs" / "iris" / "export")
    assert spec.position_vocab == read_manifest(str(data)).table.position_vocab
    values = torch.from_numpy(read_split(str(data), read_manifest(str(data)), "validation")["values"]).long()
    values = values[values[:, 4] != MISSING]
    roles = torch.where(values != MISSING, SOURCE, ABSENT).to(torch.int8)
    roles[:, 4] = TARGET
    filled = complete(model.eval(), values, roles, torch.Generator().manual_seed(0), steps=1, temperature=0)
    accuracy = (filled[:, 4] == values[:, 4]).float().mean().item()
    majority = values[:, 4].bincount().max().item() / len(values)
    assert len(values) >= 25 and accuracy >= 0.75 and accuracy > majority + 0.3, (accuracy, majority)

    # The same export as a scikit-learn style imputer: the table's own CSV, every missing cell filled.
    import pandas as pd

    from biglearn.tables import Imputer

    table = pd.read_csv(tmp_path / "iris.csv")
    filled = Imputer.load(tmp_path / "runs" / "iris" / "export").transform(table)
    assert not filled.isna().any().any() and set(filled["species"]) <= set(iris.target_names)
    assert filled.where(table.notna()).equals(table.where(table.notna()))  # observed cells kept


def test_corrupted_shard_is_named(tmp_path, capsys):
    data = tmp_path / "digits"
    ensure_digits(str(data))
    shard = data / "train-00001.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))

    assert cli.pretrain(["--set", f"data.path={data}", "--set", f"run.storage={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "corrupted" in err
    assert not (tmp_path / "runs").exists(), "nothing should be written for a run that cannot start"


@pytest.mark.parametrize("stage", [1, 3])
def test_other_zero_stages_train_and_export_full_weights(ray_cluster, digits, tmp_path, stage):
    """ZeRO-1 shards optimizer state; ZeRO-3 also shards the weights, which the export must gather
    (the retrieval memory, a buffer, included)."""
    cfg = tiny(
        digits, tmp_path, f"zero{stage}", f"cluster.zero_stage={stage}", "train.steps=4", "model.retrieval_neighbours=2"
    )
    outcome = pretrain(cfg)
    assert outcome.summary["train"]["final_step"] == 4
    model, _ = load_export(outcome.export)  # strict: a partitioned (empty) tensor would not load
    untrained = type(model)(model.spec)
    assert not torch.equal(model.head.weight, untrained.head.weight)
    training_split = read_split(digits, read_manifest(digits), "train")["values"]
    assert torch.equal(model.memory.examples, torch.from_numpy(training_split).long())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 + NCCL path)")
def test_gpu_bf16_nccl_zero3(ray_cluster, digits, tmp_path):
    cfg = tiny(
        digits,
        tmp_path,
        "gpu",
        "cluster.use_gpu=true",
        "cluster.num_workers=1",
        "cluster.zero_stage=3",
        "model.retrieval_neighbours=3",
    )
    outcome = pretrain(cfg)
    assert outcome.summary["train"]["final_step"] == 12
    assert all(0 < v < 10 for v in outcome.summary["panel_nll"].values())
