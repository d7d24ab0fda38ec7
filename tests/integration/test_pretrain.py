"""Pretraining on a real local Ray cluster: TorchTrainer (Train V2) + DeepSpeed ZeRO-2 on CPU/gloo,
two workers, Ray Data from the Parquet shards; resume after SIGKILL, after a failed run, and
after a finished one; and the bad-input errors of the job's front door."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from biglearn.data.digits import ensure_digits
from biglearn.export import load_export
from biglearn.train.loop import micro_batches
from biglearn.data.manifest import read_manifest, read_split
from biglearn.train.run import PretrainError, pretrain, shard_dataset
from tests.integration.conftest import tiny_config as tiny

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import pretrain as pretrain_job  # noqa: E402

pytestmark = pytest.mark.ray


def logged_steps(run_folder: str) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(run_folder) / "metrics.jsonl").read_text().splitlines()]


def test_sigkilled_worker_is_restarted_from_last_checkpoint(ray_cluster, digits, tmp_path):
    cfg = tiny(digits, tmp_path, "killed", "cluster.max_failures=1", "train.faults=[{kind: kill, step: 7, rank: 1}]",
               "eval.guidance=1.0", "model.retrieval_neighbours=3")
    outcome = pretrain(cfg)

    assert (tmp_path / "killed" / "faults" / "kill-rank1-step7").exists(), "the fault never fired"
    assert outcome.summary["train"] == {"final_step": 12, "resumes": [4]}
    # Steps 5-6 ran twice in wall time, but the run's history has each step exactly once.
    assert logged_steps(outcome.run_folder) == list(range(1, 13))

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
    assert {"completion_accuracy", "completion_accuracy_first_draw", "completion_accuracy_unguided", "joint_top_class_probability"} <= set(quality)
    assert quality["conditional"]["draws_per_input"] == 2 and quality["joint"]["samples"] == 4
    assert {"mmd", "mmd_reference"} <= set(quality["marginal_left_half"])
    assert spec.carries_training_data and json.loads((export / "model.json").read_text())["carries_training_data"]
    assert (Path(outcome.run_folder) / "completions.png").stat().st_size > 0
    with torch.no_grad():
        logits = model(torch.zeros(1, 64, dtype=torch.long), torch.full((1, 64), 2, dtype=torch.int8))
    assert torch.isfinite(logits).all()


def test_failed_run_keeps_last_checkpoint_and_rerun_resumes(ray_cluster, digits, tmp_path, capsys):
    failing = tiny(digits, tmp_path, "nan", "train.faults=[{kind: nan_loss, step: 10, rank: 0}]")
    with pytest.raises(PretrainError) as failure:
        pretrain(failing)
    message = str(failure.value)
    assert "non-finite loss" in message and "step 10" in message and "step 8" in message

    # The same command again (same run name): resumes from step 8 instead of starting over.
    outcome = pretrain(tiny(digits, tmp_path, "nan"))
    assert outcome.summary["train"] == {"final_step": 12, "resumes": [8]}
    assert logged_steps(outcome.run_folder) == list(range(1, 13))

    # Once more, now that it is finished: the state comes from the final checkpoint (a fresh
    # start would show no resumes) and nothing is retrained.
    again = pretrain(tiny(digits, tmp_path, "nan"))
    assert again.summary["train"] == {"final_step": 12, "resumes": [8]}
    assert logged_steps(again.run_folder) == list(range(1, 13))


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
        (["data.embedded=null", "data.path=/nonexistent/digits"], ["/nonexistent/digits", "does not exist"]),
    ],
)
def test_bad_input_is_refused_before_training(overrides, expected, capsys):
    args = [arg for item in overrides for arg in ("--set", item)]
    assert pretrain_job.main(args) == 2
    err = capsys.readouterr().err
    for fragment in expected:
        assert fragment in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "embedded, option, expected",
    [("digits-patches", "eval.guidance=1", "eval.guidance applies only to decoding token models"),
     ("digits", "model.retrieval_neighbours=2000", "it has 1437 rows of 64 x 1: set model.retrieval_neighbours to 0")],
)
def test_options_the_data_cannot_take_are_refused_before_training(tmp_path, capsys, embedded, option, expected):
    args = ["--set", f"data.path={tmp_path / 'data'}", "--set", f"data.embedded={embedded}",
            "--set", option, "--set", f"run.storage={tmp_path / 'runs'}"]
    assert pretrain_job.main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_corrupted_shard_is_named(tmp_path, capsys):
    data = tmp_path / "digits"
    ensure_digits(str(data))
    shard = data / "train-00001.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))

    assert pretrain_job.main(["--set", f"data.path={data}", "--set", f"run.storage={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "corrupted" in err
    assert not (tmp_path / "runs").exists(), "nothing should be written for a run that cannot start"


@pytest.mark.parametrize("stage", [1, 3])
def test_other_zero_stages_train_and_export_full_weights(ray_cluster, digits, tmp_path, stage):
    """ZeRO-1 shards optimizer state; ZeRO-3 also shards the weights, which the export must gather
    (the retrieval memory, a buffer, included)."""
    cfg = tiny(digits, tmp_path, f"zero{stage}", f"cluster.zero_stage={stage}", "train.steps=4",
               "model.retrieval_neighbours=2")
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
    cfg = tiny(digits, tmp_path, "gpu", "cluster.use_gpu=true", "cluster.num_workers=1", "cluster.zero_stage=3",
               "model.retrieval_neighbours=3")
    outcome = pretrain(cfg)
    assert outcome.summary["train"]["final_step"] == 12
    assert all(0 < v < 10 for v in outcome.summary["panel_nll"].values())
