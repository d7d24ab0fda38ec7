"""Training-step throughput, measured side by side in one run (run by hand, not in CI).

    python benchmarks/train_step.py [--steps 100] [--threads N] [--pairs 2] [--config biglearn/recipes/digits-quick.yaml]

Prints, for the same model and batch size:
  1. samples/s of a bare PyTorch loop vs. the Ray Train + DeepSpeed loop (one worker, the real
     `pretrain` path, throughput read from its progress records), in `--pairs` alternating pairs,
     and where the gap goes: the bare loop beside an idle local Ray, and the pretraining loop's
     DeepSpeed engine in this process without Ray;
  2. the share of a step spent sampling roles and packing (dropping absent positions);
  3. the speed-up from dropping absent positions on marginal tasks;
  4. with model.retrieval_neighbours > 0, the bare loop's speed without the retrieval path (its cost).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import ray
import torch

from biglearn.config import load_config
from biglearn.data.digits import ensure_digits
from biglearn.data.manifest import read_manifest, read_split
from biglearn.model import ModelSpec, UniversalTransformer, pack_index
from biglearn.objectives import big_learning_loss
from biglearn.roles import Schedule, sample_roles
from biglearn.train.config import PretrainConfig
from biglearn.train.engine import autocast, build_engine, cpu_bf16


def bare_loop(
    cfg: PretrainConfig,
    values: torch.Tensor,
    grid,
    steps: int,
    schedule: Schedule | None = None,
    deepspeed: bool = False,
    **model_changes,
) -> float:
    """samples/s of a plain PyTorch loop: the same model, roles and loss, no Ray, no DeepSpeed
    (with `deepspeed`, the pretraining loop's DeepSpeed engine in this process, still no Ray).
    A retrieving model remembers `values` (the training split), as the real loop's does."""
    model_cfg = cfg.model.model_copy(update=model_changes)
    schedule = schedule or cfg.schedule
    torch.manual_seed(0)
    memory_rows = len(values) if model_cfg.retrieval_neighbours else 0
    model = UniversalTransformer(
        ModelSpec(model=model_cfg, length=values.shape[1], vocab_size=17, grid=grid, memory_rows=memory_rows)
    )
    if memory_rows:
        model.memory.remember(values)
    if deepspeed:
        engine = _single_rank_engine(model, cfg)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    generator = torch.Generator().manual_seed(0)
    batch = cfg.optim.batch_size
    start = None
    for step in range(steps + 5):
        if step == 5:  # warm-up steps excluded
            start = time.perf_counter()
        rows = torch.randint(0, len(values), (batch,), generator=generator)
        x = values[rows]
        roles, family = sample_roles(schedule, batch, x.shape[1], generator, grid)
        with autocast(torch.device("cpu"), cfg.train.precision):  # the same precision as the Ray loop
            logits = (engine if deepspeed else model)(x, roles)
        loss, _ = big_learning_loss(logits, x, roles, family, cfg.optim.weighting)
        if deepspeed:
            engine.backward(loss)
            engine.step()
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def _single_rank_engine(model: torch.nn.Module, cfg: PretrainConfig):
    """The pretraining loop's DeepSpeed engine on a one-rank gloo group, as a lone Ray Train worker
    has. The launcher's variables are set only while it starts: a Ray started later by this
    process would hand them to its workers."""
    import torch.distributed as dist

    launcher = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"}
    with mock.patch.dict(os.environ, launcher):
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=0, world_size=1)
        return build_engine(model, cfg, on_gpu=False)


def overhead_share(cfg: PretrainConfig, values: torch.Tensor, grid, samples_per_s: float, repeats: int = 50) -> float:
    """Time of sample_roles + packing per step, as a share of the bare loop's step time."""
    generator = torch.Generator().manual_seed(1)
    batch = cfg.optim.batch_size
    start = time.perf_counter()
    for _ in range(repeats):
        roles, _ = sample_roles(cfg.schedule, batch, values.shape[1], generator, grid)
        pack_index(roles.long())
    per_step = (time.perf_counter() - start) / repeats
    return per_step / (batch / samples_per_s)


def ray_deepspeed_loop(cfg: PretrainConfig, data: str, steps: int, threads: int) -> float:
    """samples/s of the real pretraining path with one worker (progress windows after the first),
    on a local Ray started for it and shut down after."""
    from biglearn.train.run import pretrain

    with tempfile.TemporaryDirectory() as storage:
        run = load_config(
            PretrainConfig,
            None,
            [
                f"data.path={data}",
                f"run.storage={storage}",
                "run.name=bench",
                f"train.steps={steps}",
                f"train.log_every={max(steps // 8, 1)}",
                f"train.checkpoint_every={steps}",
                f"cluster.torch_threads={threads}",
                "eval.panel_examples=8",
                "eval.panel_steps=1",
                "eval.decode_steps=1",
                "eval.num_joint=2",
                "eval.num_shown=2",
            ]
            + [
                f"{k}={json.dumps(v)}"
                for k, v in _flatten(
                    {"model": cfg.model.model_dump(), "optim": cfg.optim.model_dump(mode="json")}
                ).items()
            ],
        )
        try:
            outcome = pretrain(run)
        finally:
            ray.shutdown()  # the next bare run gets the machine to itself
        records = [json.loads(line) for line in (Path(outcome.run_folder) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in records[1:])


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="biglearn/recipes/digits-quick.yaml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--pairs", type=int, default=2, help="bare / Ray+DeepSpeed pairs, run alternately")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(PretrainConfig, args.config)
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "digits")
        ensure_digits(data)
        manifest = read_manifest(data)
        values = torch.from_numpy(read_split(data, manifest, "train")["values"]).long()
        grid = manifest.grid

        # Pairs run alternately, each Ray started afresh and shut down before the next bare run:
        # on a shared 2-core machine the speed drifts by 10-15% within minutes, so each ratio
        # compares neighbours in time and the headline is their median.
        pairs = []
        for _ in range(args.pairs):
            bare_run = bare_loop(cfg, values, grid, args.steps)
            pairs.append((bare_run, ray_deepspeed_loop(cfg, data, args.steps * 2, args.threads)))
        ray.init()  # the same local Ray as pretrain starts, idle: what its daemons take from a bare loop
        try:
            bare_ray_idle = bare_loop(cfg, values, grid, args.steps)
        finally:
            ray.shutdown()
        bare = statistics.median(bare_run for bare_run, _ in pairs)
        in_process = bare_loop(cfg, values, grid, args.steps, deepspeed=True)
        share = overhead_share(cfg, values, grid, bare)
        without_retrieval = None
        if cfg.model.retrieval_neighbours:
            with_retrieval = bare_loop(cfg, values, grid, args.steps)
            without_retrieval = bare_loop(cfg, values, grid, args.steps, retrieval_neighbours=0)

        drop_speedup = {}
        for granularity in ("example", "batch"):
            marginal = Schedule(families={"marginal": {"weight": 1.0}}, granularity=granularity)
            dropped = bare_loop(cfg, values, grid, args.steps, marginal, drop_absent=True)
            kept = bare_loop(cfg, values, grid, args.steps, marginal, drop_absent=False)
            drop_speedup[granularity] = (dropped, kept)

    precision = "bf16 autocast" if cpu_bf16(cfg.train.precision) else "fp32"
    ratios = [ray_ds / bare_run for bare_run, ray_ds in pairs]
    print(
        f"model {cfg.model.d_model}d x {cfg.model.num_layers} layers, batch {cfg.optim.batch_size}, "
        f"{args.threads} threads, {precision}"
    )
    for index, ((bare_run, ray_ds), ratio) in enumerate(zip(pairs, ratios), 1):
        print(
            f"pair {index}: bare PyTorch loop {bare_run:8.1f}, Ray Train + DeepSpeed (1 worker) {ray_ds:8.1f} "
            f"samples/s: {ratio:.2f}x"
        )
    print(
        f"Ray Train + DeepSpeed / bare, median of {len(ratios)} pairs: {statistics.median(ratios):.2f}x  "
        f"(target >= 0.85x)"
    )
    print(
        f"bare loop with an idle local Ray up {bare_ray_idle:8.1f} samples/s: {bare_ray_idle / bare:.2f}x of the "
        "median bare run"
    )
    print(
        f"DeepSpeed engine, no Ray           {in_process:8.1f} samples/s: {in_process / bare:.2f}x of the median bare run"
    )
    print(f"roles + packing                    {100 * share:8.2f} % of a step  (target <= 5%)")
    if without_retrieval:
        print(
            f"retrieval ({cfg.model.retrieval_neighbours} neighbours of {len(values)}): {with_retrieval:.1f} vs "
            f"{without_retrieval:.1f} samples/s without, {with_retrieval / without_retrieval:.2f}x"
        )
    for granularity, (dropped, kept) in drop_speedup.items():
        print(
            f"marginal tasks per {granularity:<7} drop absent {dropped:.1f} vs keep {kept:.1f} samples/s: "
            f"{dropped / kept:.2f}x"
        )


if __name__ == "__main__":
    main()
