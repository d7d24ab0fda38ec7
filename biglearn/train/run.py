"""Driver side of pretraining: data checks, Ray, TorchTrainer, export and evaluation."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from biglearn.data.digits import ensure_digits
from biglearn.data.manifest import DatasetError, Manifest, read_manifest, shard_uris, verify_shards
from biglearn.data.storage import StorageError, absolute, check_bucket, forwarded_env, join, resolve
from biglearn.train.config import ClusterConfig, PretrainConfig
from biglearn.train.engine import cpu_bf16
from biglearn.train.evaluate import evaluate_export
from biglearn.train.loop import EXPORT, STATE, train_loop_per_worker
from biglearn.train.ownership import RunBusyError, RunLease, check_same_config


class PretrainError(RuntimeError):
    """Training did not finish; the message says why and what to do."""


@dataclass
class Outcome:
    run_folder: str
    export: str
    summary: dict


def prepare_data(cfg: PretrainConfig) -> Manifest:
    """Returns the verified manifest of the run's dataset (`cfg.data_uri`), writing the embedded
    dataset first when data.path is null and it is not there yet."""
    uri = absolute(cfg.data_uri)
    if cfg.data.path is None:
        ensure_digits(uri, continuous=cfg.data.embedded == "digits-patches")
    manifest = read_manifest(uri)
    hashed = verify_shards(uri, manifest, [cfg.data.train_split, cfg.data.validation_split], cfg.data.verify_max_bytes)
    total = len(manifest.split(cfg.data.train_split)) + len(manifest.split(cfg.data.validation_split))
    print(
        f"[biglearn] dataset {manifest.name} at {uri}: {total} shard(s) present with the manifest's sizes, "
        f"{hashed} hashed and checked",
        flush=True,
    )
    rows, needed = manifest.rows(cfg.data.train_split), cfg.micro_batch_size * cfg.cluster.num_workers
    if rows < needed:
        raise DatasetError(
            f"{uri}: split {cfg.data.train_split!r} has {rows} rows, fewer than one micro-step needs "
            f"({needed} = micro batch x workers); lower optim.batch_size or raise optim.grad_accum"
        )
    try:
        cfg.schedule.require_grid(manifest.grid)
    except ValueError as exc:
        raise DatasetError(f"{uri}: {exc}") from None
    if manifest.kind == "continuous" and cfg.eval.guidance:
        raise DatasetError(
            f"{uri}: the data is continuous, so this run trains a BigLearn-GAN, which draws every target in one "
            "pass: eval.guidance applies only to decoding token models; leave it at 0"
        )
    check_retrieval(cfg, manifest, rows, uri)
    return manifest


MEMORY_MAX_VALUES = 2**24


def check_retrieval(cfg: PretrainConfig, manifest: Manifest, rows: int, uri: str) -> None:
    """model.retrieval_neighbours keeps the training split in the model: one small enough to
    search by brute force at every step."""
    neighbours = cfg.model.retrieval_neighbours
    if neighbours and manifest.table is not None:
        raise DatasetError(
            f"{uri} is a table, whose missing cells a retrieval memory cannot compare: "
            "set model.retrieval_neighbours to 0"
        )
    if neighbours and (rows <= neighbours or rows * manifest.length * (manifest.patch_dim or 1) > MEMORY_MAX_VALUES):
        raise DatasetError(
            f"{uri}: model.retrieval_neighbours ({neighbours}) keeps split {cfg.data.train_split!r} in the model, "
            f"which needs more than {neighbours} rows and at most {MEMORY_MAX_VALUES:,} values; it has {rows} rows "
            f"of {manifest.length} x {manifest.patch_dim or 1}: set model.retrieval_neighbours to 0 (or lower it)"
        )


def connect(cluster: ClusterConfig, env: dict[str, str] | None = None) -> None:
    """Joins the configured (or RAY_ADDRESS) cluster, else starts a local one; `env` is set in
    every worker of this job (with the forwarded S3 settings)."""
    if os.environ.get("RAY_TRAIN_V2_ENABLED") == "0":
        raise PretrainError("RAY_TRAIN_V2_ENABLED=0 selects Ray Train V1; biglearn needs Train V2: unset it")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    if not ray.is_initialized():
        # address None: RAY_ADDRESS if set, else a new local Ray. Workers on other nodes need the
        # same S3 endpoint/region settings as this driver (credentials come from their own chain).
        ray.init(address=cluster.address, runtime_env={"env_vars": {**forwarded_env(), **(env or {})}})


def pretrain(cfg: PretrainConfig, callbacks: Sequence[ray.train.UserCallback] = ()) -> Outcome:
    """Trains (or resumes) `cfg.run.name`, then exports and evaluates it, holding the run's lease
    throughout. `callbacks` see every report (a sweep's trial passes Tune's, which forwards rank
    0's metrics to Tune)."""
    try:
        check_bucket(cfg.run.storage)
    except StorageError as exc:
        raise PretrainError(f"run.storage: {exc}") from None
    manifest = prepare_data(cfg)
    cfg = with_absolute_paths(cfg)
    run_uri = join(cfg.run.storage, cfg.run.name)
    try:
        with RunLease(run_uri):
            check_same_config(cfg, run_uri)
            return _train(cfg, manifest, callbacks)
    except (RunBusyError, StorageError) as exc:
        raise PretrainError(str(exc)) from None


def _train(cfg: PretrainConfig, manifest: Manifest, callbacks: Sequence[ray.train.UserCallback]) -> Outcome:
    connect(cfg.cluster)
    use_gpu = cfg.cluster.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    storage = cfg.run.storage
    fs, storage_root = resolve(storage)
    run_root = join(storage_root, cfg.run.name)

    assert cfg.data.path is not None  # pretrain made it absolute (with_absolute_paths)
    train_data = shard_dataset(cfg.data.path, manifest, cfg.data.train_split, cfg.data.block_bytes)
    if sum(shard.bytes for shard in manifest.split(cfg.data.train_split)) <= cfg.data.materialize_max_bytes:
        # Small data: read it once into the object store rather than re-reading files every epoch.
        train_data = train_data.materialize()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_json(), "manifest": manifest.model_dump(mode="json")},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks),
        ),
        datasets={"train": train_data},
        dataset_config=ray.train.DataConfig(execution_options=ordered_ingest_options()),
    )
    print(
        f"[biglearn] run {cfg.run.name}: {'BigLearn-GAN, ' if manifest.kind == 'continuous' else ''}{cfg.train.steps} steps, {cfg.cluster.num_workers} worker(s), "
        f"{_precision(use_gpu, cfg.train.precision)}, ZeRO-{cfg.cluster.zero_stage}; storage {storage}",
        flush=True,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise PretrainError(_failure_message(exc, cfg)) from None
    if result.checkpoint is None:
        raise PretrainError(f"run {cfg.run.name} finished without a checkpoint; nothing to export")

    with result.checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as staging:
        export = Path(staging) / EXPORT
        shutil.copytree(Path(folder) / EXPORT, export)
        summary = evaluate_export(
            export, cfg.data.path, manifest, cfg.data.validation_split, cfg.eval, cfg.train.precision
        )
        state = json.loads((Path(folder) / STATE).read_text())
        summary["train"] = {"final_step": state["step"], "resumes": state["resumes"]}
        # Ray node id of each rank, for the first start and every restart after it.
        summary["placements"] = state.get("placements", [])
        (Path(staging) / "summary.json").write_text(json.dumps(summary, indent=2))
        fs.delete_dir_contents(join(run_root, EXPORT), missing_dir_ok=True)
        pafs.copy_files(staging, run_root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    run_folder = join(storage, cfg.run.name)
    return Outcome(run_folder=run_folder, export=join(run_folder, EXPORT), summary=summary)


def _precision(use_gpu: bool, precision: str) -> str:
    if use_gpu:
        return "GPU/NCCL/" + ("fp32" if precision == "fp32" else "bf16")
    return "CPU/gloo/" + ("bf16 autocast" if cpu_bf16(precision) else "fp32")


def shard_dataset(path: str, manifest: Manifest, split: str, block_bytes: int) -> ray.data.Dataset:
    """A split's `values` as a Ray Dataset read lazily in blocks of at most `block_bytes`, which
    hands its blocks on in the order they were read.

    Ray Data otherwise packs small shard files into blocks of up to 128 MiB, and a training worker
    holds the block it is reading: its memory then grows with the dataset up to that size
    (benchmarks/ingest.py shows it). It would also hand blocks on in the order their reads
    finish, which changes from run to run. In read order, one worker's run is reproducible bit
    for bit and a resumed run skips exactly the batches it consumed. A Dataset keeps (a deep copy
    of) the DataContext it was created under, so both settings are scoped to this one.
    """
    context = ray.data.DataContext.get_current()
    block_default, context.target_max_block_size = context.target_max_block_size, block_bytes
    order_default, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        return ray.data.read_parquet(shard_uris(path, manifest, split)).select_columns(["values"])
    finally:
        context.target_max_block_size = block_default
        context.execution_options.preserve_order = order_default


def ordered_ingest_options() -> ray.data.ExecutionOptions:
    """Train's ingest options: the driver's, in read order. Train replaces a dataset's own
    execution options with these, so shard_dataset's order would not reach the workers otherwise."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def with_absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """`cfg` with its data path (the embedded dataset's folder when it had none) and storage path
    absolute, as the driver's folder sees them."""
    return cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"path": absolute(cfg.data_uri)}),
            "run": cfg.run.model_copy(update={"storage": absolute(cfg.run.storage)}),
        }
    )


def _failure_message(exc: ray.train.TrainingFailedError, cfg: PretrainConfig) -> str:
    """`cfg` as pretrain() made it: its storage path is already absolute."""
    failures = getattr(exc, "worker_failures", None) or {}
    reasons = sorted({f"rank {rank}: {_first_line(error)}" for rank, error in failures.items()})
    detail = "\n  ".join(reasons) if reasons else _first_line(exc)
    return (
        f"run {cfg.run.name} failed (after {cfg.cluster.max_failures} allowed restart(s)):\n  {detail}\n"
        f"Checkpoints stay under {cfg.run.storage}/{cfg.run.name}; "
        "running the same command again resumes from the latest one."
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    for marker in ("NonFiniteLossError: ", "DatasetError: "):
        if marker in text:
            return text.split(marker, 1)[1].splitlines()[0]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
