"""Training-step throughput and model FLOPs utilisation, side by side in one run (by hand; the
test suite runs it at the smallest size through gpu_check.sh --dry-run).

    python benchmarks/train_step.py [--steps 100] [--threads N] [--pairs 2] [--config biglearn/recipes/digits-quick.yaml]
    python benchmarks/train_step.py --size base --steps 4 --pairs 1     # a larger model: the pairs only
    python benchmarks/train_step.py --compile                           # also torch.compile of the bare loop
    python benchmarks/train_step.py --device cuda --size base           # on a GPU (bf16 unless the config says fp32)

Prints, for the same model and batch size:
  1. samples/s and MFU (model FLOPs over the peak of biglearn/flops.py: a GPU's datasheet bf16
     peak, or this CPU's measured matmul rate) of a bare PyTorch loop vs. the Ray Train +
     DeepSpeed loop (one worker, the real `pretrain` path, read from its progress records), in
     `--pairs` alternating pairs;
and, for the config's own model on CPU (no `--size`):
  2. where the gap goes: the bare loop beside an idle local Ray, and the pretraining loop's
     DeepSpeed engine in this process without Ray;
  3. the share of a step spent sampling roles and packing (dropping absent positions);
  4. the speed-up from dropping absent positions on marginal tasks;
  5. with model.retrieval_neighbours > 0, the bare loop's speed without the retrieval path (its cost).
With `--compile`: the bare loop with the model under torch.compile, and its compile time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import ray
import torch

from biglearn.config import load_config
from biglearn.data.digits import ensure_digits
from biglearn.data.manifest import read_manifest, read_split
from biglearn.flops import measured_matmul_flops, peak_flops, training_flops
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer, pack_index
from biglearn.objectives import big_learning_loss
from biglearn.roles import Schedule, sample_roles
from biglearn.train.config import PretrainConfig
from biglearn.train.engine import build_engine, computes_in_bf16

# --size: (d_model, layers, heads); parameters are about 12 * layers * d_model^2 (0.1M, 3.1M, 85M, 1.0B).
SIZES = {"tiny": (64, 2, 4), "small": (256, 4, 4), "base": (768, 12, 12), "1b": (2048, 20, 16)}


class Speed(NamedTuple):
    samples_per_s: float
    tflops: float


def bare_loop(
    cfg: PretrainConfig,
    values: torch.Tensor,
    grid,
    steps: int,
    schedule: Schedule | None = None,
    deepspeed: bool = False,
    device: torch.device = torch.device("cpu"),
    compile_model: bool = False,
    **model_changes,
) -> Speed:
    """Speed of a plain PyTorch loop: the same model, roles and loss, no Ray, no DeepSpeed
    (with `deepspeed`, the pretraining loop's DeepSpeed engine in this process, still no Ray).
    A retrieving model remembers `values` (the training split), as the real loop's does."""
    model_cfg = cfg.model.model_copy(update=model_changes)
    schedule = schedule or cfg.schedule
    torch.manual_seed(0)
    spec = model_spec(model_cfg, values, grid)
    model = UniversalTransformer(spec)
    if spec.memory_rows:
        model.memory.remember(values)
    model, values = model.to(device), values.to(device)
    if deepspeed:
        engine = _single_rank_engine(model, cfg)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    forward = torch.compile(model) if compile_model else model
    generator = torch.Generator(device=device).manual_seed(0)
    batch = cfg.optim.batch_size
    bf16 = computes_in_bf16(cfg.train.precision, device.type == "cuda")
    flops = 0.0
    start = 0.0
    for step in range(steps + 5):
        if step == 5:  # warm-up steps excluded
            _synchronize(device)
            start, flops = time.perf_counter(), 0.0
        rows = torch.randint(0, len(values), (batch,), generator=generator, device=device)
        x = values[rows]
        roles, family = sample_roles(schedule, batch, x.shape[1], generator, grid)
        flops += training_flops(spec, roles)
        # The same precision as the Ray loop (there DeepSpeed's bf16 on GPUs).
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = (engine if deepspeed else forward)(x, roles)
        loss, _ = big_learning_loss(logits, x, roles, family, cfg.optim.weighting)
        if deepspeed:
            engine.backward(loss)
            engine.step()
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
    _synchronize(device)
    seconds = time.perf_counter() - start
    return Speed(steps * batch / seconds, flops / seconds / 1e12)


def model_spec(model_cfg: ModelConfig, values: torch.Tensor, grid) -> ModelSpec:
    """The digits model of `model_cfg`; a retrieving one remembers `values`."""
    memory_rows = len(values) if model_cfg.retrieval_neighbours else 0
    return ModelSpec(model=model_cfg, length=values.shape[1], vocab_size=17, grid=grid, memory_rows=memory_rows)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_time(cfg: PretrainConfig, values: torch.Tensor, grid, device: torch.device) -> float:
    """Seconds of the first five steps under torch.compile, less those of five uncompiled steps."""
    times = []
    for compile_model in (False, True):
        torch._dynamo.reset()
        started = time.perf_counter()
        bare_loop(cfg, values, grid, 1, device=device, compile_model=compile_model)  # 5 warm-up steps + 1
        times.append(time.perf_counter() - started)
    return times[1] - times[0]


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


def ray_deepspeed_loop(cfg: PretrainConfig, data: str, steps: int, threads: int, gpu: bool) -> Speed:
    """Speed of the real pretraining path with one worker (medians of its progress windows after
    the first), on a local Ray started for it and shut down after."""
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
                f"cluster.use_gpu={json.dumps(gpu)}",
                f"cluster.zero_stage={cfg.cluster.zero_stage}",
                f"train.precision={cfg.train.precision}",
                "eval.panel_examples=8",
                "eval.panel_steps=1",
                "eval.decode_steps=1",
                "eval.num_joint=2",
                "eval.draws=2",
                "eval.guidance=0",
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
    samples_per_s, tflops = (statistics.median(r[key] for r in records[1:]) for key in ("samples_per_s", "tflops"))
    return Speed(samples_per_s, tflops)


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
    parser.add_argument("--size", choices=SIZES, help="the model's width, depth and heads (default: the config's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--zero-stage", type=int, choices=(1, 2, 3), help="the Ray run's ZeRO stage")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile on the bare loop")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU on this machine")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = []
    if args.size:
        d_model, layers, heads = SIZES[args.size]
        overrides += [f"model.d_model={d_model}", f"model.num_layers={layers}", f"model.num_heads={heads}"]
    if args.zero_stage:
        overrides.append(f"cluster.zero_stage={args.zero_stage}")
    cfg = load_config(PretrainConfig, args.config, overrides)
    diagnostics = args.size is None and args.device == "cpu"
    bf16 = computes_in_bf16(cfg.train.precision, device.type == "cuda")
    # Both sides' MFU against one ceiling: the best of a probe before and one after the runs (a
    # busy moment only lowers a probe), not each run's own.
    peak, peak_source = peak_flops(device, bf16)
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
            bare_run = bare_loop(cfg, values, grid, args.steps, device=device)
            ray_run = ray_deepspeed_loop(cfg, data, args.steps * 2, args.threads, args.device == "cuda")
            pairs.append((bare_run, ray_run))
        compiled = None
        if args.compile:
            compiled = (
                bare_loop(cfg, values, grid, args.steps, device=device),
                bare_loop(cfg, values, grid, args.steps, device=device, compile_model=True),
                compile_time(cfg, values, grid, device),
            )
        if diagnostics:
            ray.init()  # the same local Ray as pretrain starts, idle: what its daemons take from a bare loop
            try:
                bare_ray_idle = bare_loop(cfg, values, grid, args.steps).samples_per_s
            finally:
                ray.shutdown()
            in_process = bare_loop(cfg, values, grid, args.steps, deepspeed=True).samples_per_s
            without_retrieval = None
            if cfg.model.retrieval_neighbours:
                with_retrieval = bare_loop(cfg, values, grid, args.steps).samples_per_s
                without_retrieval = bare_loop(cfg, values, grid, args.steps, retrieval_neighbours=0).samples_per_s
            drop_speedup = {}
            for granularity in ("example", "batch"):
                marginal = Schedule(families={"marginal": {"weight": 1.0}}, granularity=granularity)
                dropped = bare_loop(cfg, values, grid, args.steps, marginal, drop_absent=True).samples_per_s
                kept = bare_loop(cfg, values, grid, args.steps, marginal, drop_absent=False).samples_per_s
                drop_speedup[granularity] = (dropped, kept)

    measured_matmul_flops.cache_clear()
    peak = max(peak, peak_flops(device, bf16)[0])
    parameters = sum(p.numel() for p in UniversalTransformer(model_spec(cfg.model, values, grid)).parameters())
    ratios = [ray_ds.samples_per_s / bare_run.samples_per_s for bare_run, ray_ds in pairs]
    print(
        f"model {cfg.model.d_model}d x {cfg.model.num_layers} layers ({parameters / 1e6:.1f}M parameters), "
        f"batch {cfg.optim.batch_size}, {args.device}, {args.threads} threads, {'bf16' if bf16 else 'fp32'}, "
        f"Ray run ZeRO-{cfg.cluster.zero_stage}; MFU against {peak / 1e9:.4g} GFLOP/s, {peak_source}"
    )
    for index, ((bare_run, ray_ds), ratio) in enumerate(zip(pairs, ratios), 1):
        print(
            f"pair {index}: bare PyTorch loop {bare_run.samples_per_s:8.1f} samples/s, {_speed(bare_run, peak)}; "
            f"Ray Train + DeepSpeed (1 worker) {ray_ds.samples_per_s:8.1f} samples/s, {_speed(ray_ds, peak)}: {ratio:.2f}x"
        )
    print(
        f"Ray Train + DeepSpeed / bare, median of {len(ratios)} pairs: {statistics.median(ratios):.2f}x  "
        f"(target >= 0.85x)"
    )
    if compiled:
        eager, under_compile, seconds = compiled
        print(
            f"torch.compile, bare loop: {under_compile.samples_per_s:.1f} vs {eager.samples_per_s:.1f} samples/s eager "
            f"({under_compile.samples_per_s / eager.samples_per_s:.2f}x, {_speed(under_compile, peak)} vs "
            f"{_speed(eager, peak)}); compiling costs {seconds:.1f} s"
        )
    if not diagnostics:
        return
    bare = statistics.median(bare_run.samples_per_s for bare_run, _ in pairs)
    share = overhead_share(cfg, values, grid, bare)
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


def _speed(speed: Speed, peak: float) -> str:
    return f"{speed.tflops * 1000:.1f} GFLOP/s, MFU {100 * speed.tflops * 1e12 / peak:.1f}%"


if __name__ == "__main__":
    main()
