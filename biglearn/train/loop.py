"""The per-worker training loop run by Ray Train's TorchTrainer.

Each worker: builds the model and its DeepSpeed engine, restores the latest checkpoint if the
run has one, streams its Ray Data shard, samples roles on its device, and trains. Every rank
saves and reports each checkpoint (DeepSpeed saves are collectives); rank 0 adds the loop
state (step, data position, metrics history) and, at the end, the servable export.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from biglearn.data.manifest import Manifest, read_split
from biglearn.data.storage import join, resolve
from biglearn.export import write_export
from biglearn.model import ModelSpec, UniversalTransformer
from biglearn.objectives import big_learning_loss
from biglearn.roles import FAMILIES, sample_roles, task_seed
from biglearn.train.config import Fault, PretrainConfig
from biglearn.train.engine import TAG, autocast, build_engine, full_state_dict
from biglearn.train.evaluate import checkpoint_panel
from biglearn.train.progress import Progress, log

STATE = "train_state.json"
EXPORT = "export"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the run stops rather than save a broken model."""


def train_loop_per_worker(payload: dict) -> None:
    cfg, manifest, rank, device, on_gpu = worker_setup(payload)
    memory = retrieval_memory(cfg, manifest)
    spec = ModelSpec(
        model=cfg.model, length=manifest.length, vocab_size=manifest.vocab_size, grid=manifest.grid,
        memory_rows=0 if memory is None else len(memory),
    )
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = UniversalTransformer(spec)
    if memory is not None:
        model.memory.remember(memory)
    model.checkpoint_activations = cfg.train.activation_checkpointing
    engine = build_engine(model, cfg, on_gpu)
    state = restored_state(cfg, rank, lambda folder: engine.load_checkpoint(str(folder), tag=TAG))
    panel_values_BL = None
    if rank == 0 and cfg.eval.checkpoint_panel_examples:
        values = read_split(cfg.data.path, manifest, cfg.data.validation_split)["values"]
        panel_values_BL = torch.from_numpy(values[: cfg.eval.checkpoint_panel_examples]).long()

    micro, accum = cfg.micro_batch_size, cfg.optim.grad_accum
    progress = Progress(cfg.train.steps, state["step"], cfg.optim.batch_size, enabled=rank == 0, run=cfg.run.name)
    window_F2 = torch.zeros(len(FAMILIES), 2, device=device)
    micro_index = 0
    for values_BL in resumable_batches(cfg, manifest, state, device):
        step = state["step"] + 1
        _inject_faults(cfg, rank, step, micro_index % accum == 0)
        values_BL = values_BL.long()
        generator = _generator(device, task_seed(cfg.train.seed, step * accum + micro_index % accum, rank, cfg.schedule))
        roles_BL, family_B = sample_roles(cfg.schedule, micro, manifest.length, generator, manifest.grid)
        with autocast(device, cfg.train.precision):
            logits_BLV = engine(values_BL, roles_BL)
        loss, stats_F2 = big_learning_loss(logits_BLV, values_BL, roles_BL, family_B, cfg.optim.weighting)
        if _fault_due(cfg, rank, step, "nan_loss"):
            loss = loss * float("nan")
        check_finite(loss, state, step, rank)
        engine.backward(loss)
        engine.step()
        window_F2 += stats_F2
        micro_index += 1
        if micro_index % accum:
            continue
        state["step"] = step
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            record = progress.log(step, _all_sum(window_F2), engine.get_lr()[0])
            state["history"].append(record)
            window_F2.zero_()
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            _save(engine, state, cfg, spec, manifest, rank, step == cfg.train.steps, panel_values_BL)


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


def retrieval_memory(cfg: PretrainConfig, manifest: Manifest) -> torch.Tensor | None:
    """The whole training split ([N, L] tokens or [N, L, P] patches) when the model retrieves
    neighbours from it (read by every rank, so that all hold the same memory), else None."""
    if not cfg.model.retrieval_neighbours:
        return None
    examples = torch.from_numpy(read_split(cfg.data.path, manifest, cfg.data.train_split)["values"])
    return examples.float() if manifest.patch_dim else examples.long()


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


def resumable_batches(cfg: PretrainConfig, manifest: Manifest, state: dict, device):
    """Micro-batches of this worker's shard, epoch after epoch, from the data position in `state`
    (which advances as they are taken) until state["step"] reaches the run's steps.

    A background thread reads them a few micro-batches ahead, so the next epoch starts while this
    one trains: starting one costs 30-90 ms (a round trip to Ray Data's split coordinator and a
    new execution), about 2% of a step on the digits (benchmarks/train_step.py)."""
    shard = ray.train.get_dataset_shard("train")
    rows = fetch_rows(manifest, cfg.data.fetch_bytes)

    def epochs():
        epoch = state["epoch"]
        while True:
            seed = cfg.train.seed + epoch
            for values in micro_batches(shard, cfg.micro_batch_size, rows, cfg.data.shuffle_buffer, seed, device):
                yield epoch, values
            epoch += 1

    index = 0
    with read_ahead(epochs(), AHEAD) as batches:
        for epoch, values in batches:
            if state["step"] >= cfg.train.steps:
                return
            if epoch != state["epoch"]:
                state["epoch"], state["batches_in_epoch"], index = epoch, 0, 0
            index += 1
            if index <= state["batches_in_epoch"]:
                continue  # resuming mid-epoch: these were consumed before the checkpoint
            state["batches_in_epoch"] = index
            yield values


AHEAD = 4  # micro-batches read ahead: enough to hide an epoch's start behind the steps before it


@contextlib.contextmanager
def read_ahead(items: Iterator, ahead: int):
    """`items`, drawn by a daemon thread up to `ahead` in advance; its errors re-raise here. On
    exit the thread stops at its next hand-over."""
    handed, stop, done = queue.Queue(maxsize=ahead), threading.Event(), object()

    def hand_over(entry: tuple) -> bool:
        """False once the consumer has left (the entry is dropped)."""
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                handed.put(entry, timeout=0.1)
                return True
        return False

    def draw() -> None:
        try:
            for item in items:
                if not hand_over((item, None)):
                    return
            hand_over((done, None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            hand_over((done, error))

    def drawn() -> Iterator:
        while True:
            item, error = handed.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item

    thread = threading.Thread(target=draw, name="biglearn-read-ahead", daemon=True)
    thread.start()
    try:
        yield drawn()
    finally:
        stop.set()


def check_finite(loss: torch.Tensor, state: dict, step: int, rank: int) -> None:
    if not torch.isfinite(loss):
        last = state["last_checkpoint"]
        kept = f"the last good checkpoint (step {last}) is kept" if last else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at step {step} on rank {rank}: the run stops here and "
            f"{kept}; lower optim.lr or raise optim.warmup_steps, then run again"
        )


def fetch_rows(manifest: Manifest, fetch_bytes: int) -> int:
    return max(1, fetch_bytes // (manifest.length * (manifest.patch_dim or 1) * 4))


def micro_batches(shard, micro: int, fetch_rows: int, shuffle_buffer: int | None, seed: int | None, device):
    """The epoch's `values` as micro-batches of `micro` rows (a trailing partial one is dropped),
    cut from Ray Data batches of about `fetch_rows` rows: Ray Data pays a fixed cost per batch,
    which dominates at micro-batch sizes (benchmarks/ingest.py measures it)."""
    fetch = max(1, fetch_rows // micro) * micro
    for batch in shard.iter_torch_batches(
        batch_size=fetch,
        drop_last=False,
        local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=seed if shuffle_buffer else None,
        device=device,
    ):
        values = batch["values"]
        for first in range(0, len(values) - micro + 1, micro):
            yield values[first : first + micro]


def _save(engine, state: dict, cfg: PretrainConfig, spec: ModelSpec, manifest: Manifest, rank: int, final: bool,
          panel_values_BL: torch.Tensor | None):
    scored = cfg.eval.checkpoint_panel_examples is not None
    weights = full_state_dict(engine) if final or scored else None  # a collective under ZeRO-3

    def save(folder: Path) -> None:
        engine.save_checkpoint(str(folder), tag=TAG)
        if rank == 0 and final:
            write_export(folder / EXPORT, weights, spec, manifest.model_dump(mode="json"), cfg.to_json())

    scores = {}
    if panel_values_BL is not None:
        scores = checkpoint_panel(weights, spec, panel_values_BL, cfg.eval.panel_steps, cfg.train.precision)
    report_checkpoint(state, rank, save, scores)


def report_checkpoint(state: dict, rank: int, save: Callable[[Path], None], scores: dict[str, float] | None = None) -> None:
    """Every rank saves (`save` into a fresh folder: DeepSpeed saves are collectives) and reports
    the checkpoint of state["step"]; rank 0 adds the loop state. `scores` are reported with it
    (Train V2 keeps only metrics that come with a checkpoint): a sweep's intermediate objective."""
    step = state["last_checkpoint"] = state["step"]
    with tempfile.TemporaryDirectory() as folder:
        save(Path(folder))
        if rank == 0:
            (Path(folder) / STATE).write_text(json.dumps(state))
        metrics = {"step": step, **({"loss": state["history"][-1]["loss"]} if state["history"] else {}), **(scores or {})}
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"step-{step:08d}",
        )


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _node_ids_by_rank() -> list[str]:
    """The Ray node id of every rank, in rank order: where this attempt of the run was placed."""
    node_id = ray.get_runtime_context().get_node_id()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [node_id]
    node_ids = [None] * dist.get_world_size()
    dist.all_gather_object(node_ids, node_id)
    return node_ids


def _all_sum(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _fault_due(cfg: PretrainConfig, rank: int, step: int, kind: str) -> bool:
    """True once per run for a planned fault (a marker in the run folder records that it fired)."""
    for fault in cfg.train.faults:
        if (fault.kind, fault.rank, fault.step) == (kind, rank, step):
            return _fire_once(cfg, fault)
    return False


def _inject_faults(cfg: PretrainConfig, rank: int, step: int, first_micro: bool) -> None:
    if first_micro and _fault_due(cfg, rank, step, "kill"):
        # Ray commits a checkpoint only once the controller has collected every rank's report;
        # a crash just after report() can lose it. Kill after the commit, so drills are exact.
        ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
        log.info(f"[biglearn] fault plan: killing rank {rank} (pid {os.getpid()}) at step {step}")
        os.kill(os.getpid(), 9)


def _fire_once(cfg: PretrainConfig, fault: Fault) -> bool:
    fs, root = resolve(cfg.run.storage)
    marker = join(root, f"{cfg.run.name}/faults/{fault.kind}-rank{fault.rank}-step{fault.step}")
    if fs.get_file_info(marker).type.name != "NotFound":
        return False
    fs.create_dir(marker.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(marker) as out:
        out.write(b"fired")
    return True

