"""BigLearn-GAN under Ray Train: two DeepSpeed engines (ZeRO-2, CPU/gloo) on the continuous
digits; a run killed mid-way and resumed ends exactly where an uninterrupted run ends, logged
losses and exported weights bit for bit, with gradient accumulation (so both networks, both
optimizers, the schedule and the data position round-trip). The data is in several shards, read
as several blocks: the runs agree only because Ray Data hands them to the worker in read order
(biglearn/train/run.py sets preserve_order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from biglearn.data.manifest import read_manifest
from biglearn.data.prepare import write_source
from biglearn.data.sources import digits_source
from biglearn.export import load_export
from biglearn.model import UniversalTransformer
from biglearn.train.ingest import micro_batches
from biglearn.train.run import pretrain, shard_dataset
from biglearn.train.steps import retrieval_memory
from tests.integration.conftest import metrics_history, tiny_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def digit_patches(tmp_path_factory) -> str:
    """The continuous digits in 4 training shards of up to 400 rows."""
    path = str(tmp_path_factory.mktemp("data") / "digit-patches")
    write_source(digits_source("patches"), path, name="digits", validation_fraction=0.2, seed=0, rows_per_shard=400)
    return path


def tiny_gan(data: str, storage: Path, name: str, *extra: str):
    return tiny_config(
        data,
        storage,
        name,
        "gan.noise_dim=4",
        "gan.transform_probability=0.3",
        "cluster.num_workers=1",
        "train.steps=8",
        "model.retrieval_neighbours=3",
        *extra,
    )


def test_rows_reach_the_worker_bit_for_bit_as_the_retrieval_memory_holds_them(ray_cluster, digit_patches):
    """A generator skips memory rows equal to its training example (else it would retrieve its own
    targets): that needs the rows Ray Data delivers to equal the memory's exactly."""
    manifest = read_manifest(digit_patches)
    cfg = tiny_gan(digit_patches, Path("unused"), "memory")
    memory = retrieval_memory(cfg, manifest)
    dataset = shard_dataset(digit_patches, manifest, "train", cfg.data.block_bytes)
    rows = torch.cat(list(micro_batches(dataset, 64, 512, None, None, torch.device("cpu"))))
    assert len(rows) == len(memory) // 64 * 64 and memory.dtype == rows.dtype == torch.float32
    flat_memory = memory.flatten(1)
    assert all(bool((flat_memory == row.flatten()).all(1).any()) for row in rows)


def test_killed_gan_run_resumes_to_the_same_weights_as_an_uninterrupted_one(ray_cluster, digit_patches, tmp_path):
    # 1,437 rows in batches of 256 (two micro-batches of 128 an optimizer step): an epoch is 5
    # steps, so the restart from step 6 resumes in the second epoch (its data order comes from the
    # epoch's own shuffle seed).
    epochs = ["optim.batch_size=256", "optim.grad_accum=2", "train.checkpoint_every=3"]
    straight = pretrain(tiny_gan(digit_patches, tmp_path, "straight", *epochs))
    killed = pretrain(
        tiny_gan(
            digit_patches,
            tmp_path,
            "killed",
            *epochs,
            "cluster.max_failures=1",
            "train.faults=[{kind: kill, step: 7, rank: 0}]",
        )
    )

    assert (tmp_path / "killed" / "faults" / "kill-rank0-step7").exists(), "the fault never fired"
    assert straight.summary["train"] == {"final_step": 8, "resumes": []}
    assert killed.summary["train"] == {"final_step": 8, "resumes": [6]}
    history = metrics_history(killed.run_folder)
    assert [record["step"] for record in history] == list(range(1, 9))
    assert all({"loss", "critic", "r1", "critic_at_chance", "families"} <= set(record) for record in history)

    # Steps 7-8 after the restart must see the same critic, optimizer moments, LR schedule,
    # tasks, noise and data as without it: any of them missing would move the generator.
    assert all(record["flops"] > 0 and 0 < record["mfu"] < 1 for record in history)
    for key in ("loss", "critic", "r1", "families", "flops"):
        assert [record[key] for record in history] == [
            record[key] for record in metrics_history(straight.run_folder)
        ], key
    resumed, uninterrupted = (load_file(Path(run.export) / "model.safetensors") for run in (killed, straight))
    assert resumed.keys() == uninterrupted.keys()
    for name, weights in uninterrupted.items():
        assert torch.equal(resumed[name], weights), name
    _, spec = load_export(straight.export)
    torch.manual_seed(0)  # train.seed: the loop builds the generator first from this seed
    initial = UniversalTransformer(spec).state_dict()
    assert all(
        not torch.allclose(weights, initial[name]) for name, weights in uninterrupted.items() if "norm" not in name
    )

    generator, spec = load_export(killed.export)
    assert spec.noise_dim == 4 and spec.patch_dim == 4 and spec.grid == (4, 4) and not spec.critic
    assert spec.memory_rows == 1437 and generator.memory.examples.abs().sum() > 0
    checkpoint = Path(killed.run_folder) / "step-00000008"
    assert (checkpoint / "generator" / "ds").is_dir() and (checkpoint / "critic" / "ds").is_dir()
    panel = json.loads((Path(killed.export) / "panel.json").read_text())
    assert {"joint", "bottom_half"} <= set(panel["generator_panel"])
    assert panel["quality"]["completion_pairwise_distance"] > 0  # noise matters
    assert 0 <= panel["quality"]["completion_accuracy"] <= 1
    assert {"class_tv", "mmd", "near_copies"} <= set(panel["quality"]["joint"])
    assert (Path(killed.run_folder) / "completions.png").stat().st_size > 0


def write_idx_images(path: Path, images) -> None:
    """An MNIST-style IDX file: magic 00 00 08 03, big-endian sizes, then the bytes."""
    import numpy as np

    count, height, width = images.shape
    header = bytes([0, 0, 8, 3]) + np.array([count, height, width], dtype=">i4").tobytes()
    path.write_bytes(header + images.astype(np.uint8).tobytes())


@pytest.mark.parametrize("recipe", ["mnist-gan", "celeba64-gan"])
def test_mnist_and_celeba_recipes_start_and_step(ray_cluster, tmp_path, recipe):
    """The GPU recipes, shrunk to a tiny model on tiny synthetic data made here by prepare_data's
    converters: MNIST-shaped IDX (28x28, 4x4 patches) and an RGB image folder (64x64, 8x8 patches,
    so transformed views rotate each 192-value patch)."""
    import numpy as np
    from PIL import Image

    from biglearn.config import load_config
    from biglearn.data.prepare import PrepareConfig, prepare_dataset
    from biglearn.train.config import PretrainConfig

    rng = np.random.default_rng(0)
    if recipe == "mnist-gan":
        write_idx_images(tmp_path / "images-idx3-ubyte", rng.integers(0, 256, (40, 28, 28)))
        source = {"kind": "idx", "images": str(tmp_path / "images-idx3-ubyte"), "encoding": "patches", "patch": 4}
    else:
        (tmp_path / "faces").mkdir()
        for index in range(40):
            Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(
                tmp_path / "faces" / f"{index:03d}.png"
            )
        source = {
            "kind": "images",
            "folder": str(tmp_path / "faces"),
            "resolution": 64,
            "encoding": "patches",
            "patch": 8,
        }
    data = str(tmp_path / "data")
    manifest = prepare_dataset(PrepareConfig(source=source, output=data, validation_fraction=0.2, workers=0))
    assert manifest.kind == "continuous"

    recipe_file = Path(__file__).resolve().parents[2] / "biglearn" / "recipes" / f"{recipe}.yaml"
    cfg = load_config(
        PretrainConfig,
        recipe_file,
        [
            f"data.path={data}",
            f"run.storage={tmp_path / 'runs'}",
            "model.d_model=32",
            "model.num_layers=1",
            "model.num_heads=2",
            "gan.noise_dim=4",
            "optim.batch_size=8",
            "optim.warmup_steps=1",
            "train.steps=2",
            "train.log_every=1",
            "train.checkpoint_every=2",
            "cluster.num_workers=1",
            "cluster.use_gpu=false",
            "cluster.torch_threads=1",
            "eval.panel_examples=4",
        ],
    )
    outcome = pretrain(cfg)
    assert outcome.summary["train"]["final_step"] == 2
    history = metrics_history(outcome.run_folder)
    assert [record["step"] for record in history] == [1, 2]
    assert all(np.isfinite(record["loss"]) and np.isfinite(record["critic"]) for record in history)
    _, spec = load_export(outcome.export)
    assert (spec.length, spec.patch_dim) == ((49, 16) if recipe == "mnist-gan" else (64, 192))
