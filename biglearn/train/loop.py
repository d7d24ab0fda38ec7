"""The per-worker training loop run by Ray Train's TorchTrainer, for every objective.

Each worker: builds its objective's engines (biglearn/train/steps.py), restores the latest
checkpoint if the run has one, streams its Ray Data shard (biglearn/train/ingest.py), draws each
micro-batch's tasks on its device, and trains. Every rank saves and reports each checkpoint
(DeepSpeed saves are collectives); rank 0 adds the loop state (step, data position, metrics
history) and, at the end, the servable export, and adds each progress line to the run's
metrics.jsonl as it is logged; a resumed run first rewrites the file with the history of its
checkpoint, so a stopped run keeps its history and a resumed one lists each step once.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from biglearn.data.manifest import MISSING, Manifest
from biglearn.data.storage import append_bytes, is_s3, join, resolve, write_bytes
from biglearn.export import write_export
from biglearn.flops import peak_flops
from biglearn.roles import sample_roles, task_seed, without_missing
from biglearn.train.config import Fault, PretrainConfig
from biglearn.train.engine import all_sum, computes_in_bf16, full_state_dict
from biglearn.train.ingest import resumable_batches
from biglearn.train.progress import Progress, log
from biglearn.train.steps import TrainingStep, seeded_generator, training_step

STATE = "train_state.json"
EXPORT = "export"
METRICS = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the run stops rather than save a broken model."""


def train_loop_per_worker(payload: dict) -> None:
    cfg, manifest, rank, device, on_gpu = worker_setup(payload)
    trainer = training_step(cfg, manifest, rank, device, on_gpu)
    state = restored_state(cfg, rank, trainer.load)
    if rank == 0:
        write_history(cfg, state["history"])  # drops the lines of steps after the restored checkpoint
    faults = FaultPlan(cfg, rank)
    accum = cfg.optim.grad_accum
    tensorboard_dir = (
        join(join(cfg.run.storage, cfg.run.name), "tensorboard") if cfg.train.tracker == "tensorboard" else None
    )
    progress = Progress(
        cfg.train.steps,
        state["step"],
        cfg.optim.batch_size,
        peak_flops=run_peak_flops(cfg, device, rank),
        enabled=rank == 0,
        run=cfg.run.name,
        tensorboard_dir=tensorboard_dir,
    )
    try:
        micro = 0  # micro-step within the optimizer step; checkpoints fall between optimizer steps
        for values in resumable_batches(cfg, manifest, state, device):
            step = state["step"] + 1
            if micro == 0:
                faults.before_step(step)
            task_generator = seeded_generator(device, task_seed(cfg.train.seed, step, rank, cfg.schedule, micro, accum))
            roles_BL, family_B = sample_roles(cfg.schedule, len(values), manifest.length, task_generator, manifest.grid)
            if manifest.table is not None:
                roles_BL = without_missing(roles_BL, values != MISSING, task_generator)

            def guard(loss: torch.Tensor) -> torch.Tensor:
                loss = faults.poisoned(loss, step)
                check_finite(loss, state, step, rank)
                return loss

            trainer.micro_step(values, roles_BL, family_B, task_generator, step, micro, guard)
            micro = (micro + 1) % accum
            if micro:
                continue
            state["step"] = step
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                stats_F2, flops, extra = trainer.take_window()
                record = progress.log(step, stats_F2, flops, trainer.learning_rate(), extra)
                trainer.annotate(record, state["history"])
                state["history"].append(record)
                if rank == 0:
                    write_history(cfg, state["history"], appended=True)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                save_checkpoint(trainer, state, cfg, manifest, rank, final=step == cfg.train.steps)
    finally:
        progress.close()  # TensorBoard's writer drains its queue: a failed run keeps its last records too


def worker_setup(payload: dict) -> tuple[PretrainConfig, Manifest, int, torch.device, bool]:
    """(config, manifest, rank, device, on_gpu) of this worker; CPU threads set."""
    cfg = PretrainConfig.model_validate(payload["config"])
    manifest = Manifest.model_validate(payload["manifest"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(cfg.torch_threads())
    return cfg, manifest, rank, device, on_gpu


def run_peak_flops(cfg: PretrainConfig, device: torch.device, rank: int) -> float:
    """The FLOP/s of all ranks' devices together (a collective): what MFU is measured against.
    Every rank measures its own at once (on CPUs a matmul probe, so ranks that share a machine
    share it as training does)."""
    peak, source = peak_flops(device, computes_in_bf16(cfg.train.precision, device.type == "cuda"))
    total = all_sum(torch.tensor([peak], dtype=torch.float64, device=device)).item()
    if rank == 0:
        log.info(
            f"[biglearn] MFU counts from {total / 1e9:.4g} GFLOP/s: the ranks' devices together (rank 0: {source})"
        )
    return total


def write_history(cfg: PretrainConfig, history: list[dict], appended: bool = False) -> None:
    """The run's metrics.jsonl, one progress record a line, written whole (readers never see
    half of it); with `appended`, only the last record is added to a local file. Object stores
    cannot append, so there the file is always written whole."""
    uri = join(join(cfg.run.storage, cfg.run.name), METRICS)
    if appended and not is_s3(uri):
        append_bytes(uri, (json.dumps(history[-1]) + "\n").encode())
    else:
        write_bytes(uri, "".join(json.dumps(record) + "\n" for record in history).encode())


def restored_state(cfg: PretrainConfig, rank: int, load: Callable[[Path], None]) -> dict:
    """The loop state of the latest checkpoint (after `load` restored the engines from its
    folder), or a fresh one."""
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "last_checkpoint": 0, "resumes": [], "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            load(Path(folder))
            state = json.loads((Path(folder) / STATE).read_text())
        state["resumes"].append(state["step"])
        if rank == 0:
            log.info(f"[biglearn] resumed from step {state['step']}/{cfg.train.steps}")
    state.setdefault("placements", []).append(_node_ids_by_rank())
    return state


def check_finite(loss: torch.Tensor, state: dict, step: int, rank: int) -> None:
    if not torch.isfinite(loss):
        last = state["last_checkpoint"]
        kept = f"the last good checkpoint (step {last}) is kept" if last else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at step {step} on rank {rank}: the run stops here and "
            f"{kept}; lower optim.lr or raise optim.warmup_steps, then run again"
        )


def save_checkpoint(
    trainer: TrainingStep, state: dict, cfg: PretrainConfig, manifest: Manifest, rank: int, final: bool
) -> None:
    weights = full_state_dict(trainer.export_engine) if final or trainer.scored else None  # a collective under ZeRO-3

    def save(folder: Path) -> None:
        trainer.save(folder)
        if rank == 0 and final:
            assert weights is not None  # gathered for the final checkpoint
            write_export(folder / EXPORT, weights, trainer.export_spec, manifest.model_dump(mode="json"), cfg.to_json())

    scores = trainer.scores(weights) if weights is not None and trainer.scored and rank == 0 else {}
    report_checkpoint(state, rank, save, scores)


def report_checkpoint(
    state: dict, rank: int, save: Callable[[Path], None], scores: dict[str, float] | None = None
) -> None:
    """Every rank saves (`save` into a fresh folder: DeepSpeed saves are collectives) and reports
    the checkpoint of state["step"]; rank 0 adds the loop state. `scores` are reported with it
    (Train V2 keeps only metrics that come with a checkpoint): a sweep's intermediate objective."""
    step = state["last_checkpoint"] = state["step"]
    with tempfile.TemporaryDirectory() as folder:
        save(Path(folder))
        if rank == 0:
            (Path(folder) / STATE).write_text(json.dumps(state))
        metrics = {
            "step": step,
            **({"loss": state["history"][-1]["loss"]} if state["history"] else {}),
            **(scores or {}),
        }
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"step-{step:08d}",
        )


def _node_ids_by_rank() -> list[str]:
    """The Ray node id of every rank, in rank order: where this attempt of the run was placed."""
    node_id = ray.get_runtime_context().get_node_id()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [node_id]
    node_ids = [None] * dist.get_world_size()
    dist.all_gather_object(node_ids, node_id)
    return cast(list[str], node_ids)  # all_gather_object filled in every rank's


class FaultPlan:
    """Planned faults of this rank (tests and chaos drills), each fired once per run: a marker in
    the run folder records that it fired, so the restarted run goes on."""

    def __init__(self, cfg: PretrainConfig, rank: int):
        self.cfg, self.rank = cfg, rank
        self.planned = {(fault.kind, fault.step): fault for fault in cfg.train.faults if fault.rank == rank}

    def before_step(self, step: int) -> None:
        if self.planned and self._due("kill", step):
            # Ray commits a checkpoint only once the controller has collected every rank's report;
            # a crash just after report() can lose it. Kill after the commit, so drills are exact.
            ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
            log.info(f"[biglearn] fault plan: killing rank {self.rank} (pid {os.getpid()}) at step {step}")
            os.kill(os.getpid(), 9)

    def poisoned(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if self.planned and self._due("nan_loss", step):
            return loss * float("nan")
        return loss

    def _due(self, kind: str, step: int) -> bool:
        fault = self.planned.get((kind, step))
        return fault is not None and _fire_once(self.cfg, fault)


def _fire_once(cfg: PretrainConfig, fault: Fault) -> bool:
    fs, root = resolve(cfg.run.storage)
    marker = join(root, f"{cfg.run.name}/faults/{fault.kind}-rank{fault.rank}-step{fault.step}")
    if fs.get_file_info(marker).type.name != "NotFound":
        return False
    fs.create_dir(marker.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(marker) as out:
        out.write(b"fired")
    return True
