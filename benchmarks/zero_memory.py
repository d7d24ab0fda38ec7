"""What ZeRO sharding saves: each rank's bytes for parameters, gradients and optimizer state at
ZeRO stage 1, 2 and 3, beside what ZeRO's accounting predicts (by hand; the test suite runs it
at a small size).

    python benchmarks/zero_memory.py                     # about 100M parameters, 2 workers
    python benchmarks/zero_memory.py --d-model 256 --layers 4 --steps 3

Two Ray Train workers, one on each node of a local two-node Ray cluster, build the pretraining
loop's DeepSpeed engine (biglearn/train/engine.py: fp32, gloo, torch's AdamW) around the digits
model and train a few steps on random tokens. After the last backward pass (gradients reduced,
before the optimizer step) each rank counts the bytes it holds, each storage once; it also
counts them as the backward pass ends, before DeepSpeed's epilogue reduces the last bucket and
frees full gradients: the in-backward peak. ZeRO's accounting (Rajbhandari et al., 2020) for
Psi parameters on N ranks in fp32 with Adam: parameters 4 Psi (stages 1, 2) or 4 Psi/N (3);
gradients 4 Psi (1) or 4 Psi/N (2, 3); optimizer state 12 Psi/N (an fp32 master copy and
Adam's two moments). That accounting is of model states; the gradients of other ranks' shards
that wait in a bucket for their reduction are a residual state beside it (ZeRO-R's
constant-size buffers, the paper's section 6), shown on their own against one bucket. Then
the same per-worker batch on one worker and on two (ZeRO-2): samples/s.

The byte counts read DeepSpeed 0.19's own attributes (`zero_memory_by_kind`): a benchmark may,
the product does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

KINDS = ("parameters", "gradients", "gradients_awaiting_reduction", "optimizer_state")


def held_tensors(engine) -> dict[str, list[torch.Tensor]]:
    """The tensors behind each kind of state on this rank (DeepSpeed 0.19, CPU, no offload).
    `gradients` are the ones this rank keeps for its own shard (stages 1 and 2: the full
    gradients of the parameters its shard touches; stage 3: its flat partition);
    `gradients_awaiting_reduction` are full gradients of other shards that a bucket has not
    reduced yet (stage 3: every full gradient)."""
    opt = engine.optimizer
    stage3 = hasattr(opt, "fp32_partitioned_groups_flat")
    params = [p.data for p in engine.module.parameters()]
    params += [p.ds_tensor for p in engine.module.parameters() if getattr(p, "ds_tensor", None) is not None]
    for name in ("bit16_groups_flat", "lp_param_buffer", "fp16_partitioned_groups_flat"):
        params += _listed(getattr(opt, name, None))
    own, awaiting = [], []
    for param in engine.module.parameters():
        if param.grad is not None:
            kept = not stage3 and opt.is_param_in_current_partition[opt.get_param_id(param)]
            (own if kept else awaiting).append(param.grad)
    for name in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer"):
        own += _listed(getattr(opt, name, None))
    for bucket in getattr(opt, "ipg_buckets", {}).values():
        awaiting += _listed(getattr(bucket, "grads", None)) + _listed(getattr(bucket, "buffer", None))
    masters = _listed(getattr(opt, "fp32_partitioned_groups_flat" if stage3 else "single_partition_of_fp32_groups"))
    state = masters + [t for moments in opt.optimizer.state.values() for t in _listed(moments)]
    return {
        "parameters": params,
        "gradients": own,
        "gradients_awaiting_reduction": awaiting,
        "optimizer_state": state,
    }


def _listed(holder) -> list[torch.Tensor]:
    """The tensors in a tensor, or in (nested) lists, tuples and dicts of them."""
    if isinstance(holder, torch.Tensor):
        return [holder]
    if isinstance(holder, dict):
        holder = list(holder.values())
    if isinstance(holder, (list, tuple)):
        return [t for item in holder for t in _listed(item)]
    return []


def zero_memory_by_kind(engine) -> dict[str, int]:
    """Bytes of each kind this rank holds, each storage counted once (under the first kind that
    reaches it) and whole: a view that pins a larger buffer keeps all of it alive."""
    seen: set[int] = set()
    held = dict.fromkeys(KINDS, 0)
    for kind, tensors in held_tensors(engine).items():
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                held[kind] += storage.nbytes()
    return held


def train_and_count(config: dict) -> None:
    """One Ray Train worker: a few steps, the counts after the last backward and at its peak."""
    import ray.train

    from biglearn.model import ModelSpec, UniversalTransformer
    from biglearn.objectives import big_learning_loss
    from biglearn.roles import sample_roles
    from biglearn.train.config import PretrainConfig
    from biglearn.train.engine import build_engine

    torch.set_num_threads(1)
    cfg = PretrainConfig.model_validate(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    model = UniversalTransformer(ModelSpec(model=cfg.model, length=64, vocab_size=17, grid=(8, 8)))
    engine = build_engine(model, cfg, on_gpu=False)
    peaks: list[dict[str, int]] = []
    epilogue = engine.optimizer.independent_gradient_partition_epilogue

    def counted_epilogue(*args, **kwargs):
        peaks.append(zero_memory_by_kind(engine))
        return epilogue(*args, **kwargs)

    engine.optimizer.independent_gradient_partition_epilogue = counted_epilogue
    generator = torch.Generator().manual_seed(rank)
    batch, seconds = cfg.micro_batch_size, []
    after_backward: dict[str, int] = {}
    for _ in range(config["steps"]):
        values = torch.randint(0, 17, (batch, 64), generator=generator)
        roles, family = sample_roles(cfg.schedule, batch, 64, generator, (8, 8))
        started = time.perf_counter()
        loss, _ = big_learning_loss(engine(values, roles), values, roles, family, cfg.optim.weighting)
        engine.backward(loss)
        after_backward = zero_memory_by_kind(engine)  # from the second step on, Adam's moments exist
        engine.step()
        seconds.append(time.perf_counter() - started)
    result = {
        "rank": rank,
        "parameters": sum(p.numel() for p in model.parameters()),
        "largest_parameter": max(p.numel() for p in model.parameters()),
        "after_backward": after_backward,
        "peak": peaks[-1],
        "step_seconds": statistics.median(seconds[1:]),
    }
    (Path(config["out"]) / f"rank{rank}.json").write_text(json.dumps(result))


def run(cfg_json: dict, workers: int, steps: int) -> list[dict]:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as out:
        TorchTrainer(
            train_and_count,
            train_loop_config={"cfg": cfg_json, "steps": steps, "out": out},
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        ).fit()
        return [json.loads((Path(out) / f"rank{rank}.json").read_text()) for rank in range(workers)]


def predicted(stage: int, psi: int, ranks: int) -> dict[str, float]:
    return {
        "parameters": 4 * psi / (ranks if stage == 3 else 1),
        "gradients": 4 * psi / (ranks if stage >= 2 else 1),
        "optimizer_state": 12 * psi / ranks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="examples per worker and step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bucket-elements", type=int, help="cluster.zero_bucket_elements (default: the config's)")
    args = parser.parse_args()

    from ray.cluster_utils import Cluster

    from biglearn.config import load_config
    from biglearn.train.config import PretrainConfig

    def config(stage: int, workers: int) -> dict:
        overrides = [
            f"model.d_model={args.d_model}",
            f"model.num_layers={args.layers}",
            f"model.num_heads={args.heads}",
            "model.retrieval_neighbours=0",
            f"cluster.zero_stage={stage}",
            f"cluster.num_workers={workers}",
            f"optim.batch_size={args.batch * workers}",
        ]
        if args.bucket_elements:
            overrides.append(f"cluster.zero_bucket_elements={args.bucket_elements}")
        return load_config(PretrainConfig, "biglearn/recipes/digits-quick.yaml", overrides).to_json()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        by_stage = {stage: run(config(stage, 2), 2, args.steps) for stage in (1, 2, 3)}
        one_worker = run(config(2, 1), 1, args.steps)
    finally:
        ray.shutdown()
        cluster.shutdown()

    psi = by_stage[1][0]["parameters"]
    bucket = PretrainConfig.model_validate(config(2, 2)).cluster.zero_bucket_elements
    # A bucket is reduced before the gradient that would overflow it joins, so it holds at most
    # the larger of its size and one parameter.
    one_bucket = 4 * max(bucket, by_stage[1][0]["largest_parameter"])
    print(
        f"{psi / 1e6:.2f}M parameters (Psi), 2 ranks, fp32, AdamW, buckets of {bucket:.3g} gradient elements; "
        "MB per rank, measured / ZeRO's accounting (awaiting reduction: measured / one bucket)"
    )
    print(
        "stage | rank | parameters | gradients after backward | gradients at backward's end "
        "| awaiting reduction at backward's end | optimizer state"
    )
    for stage, ranks in by_stage.items():
        expected = predicted(stage, psi, 2)
        for result in ranks:
            after, peak = result["after_backward"], result["peak"]
            # Stage 1 keeps every gradient until the optimizer step: the accounting counts them all.
            counted = peak["gradients"] + (peak["gradients_awaiting_reduction"] if stage == 1 else 0)
            awaiting = "counted" if stage == 1 else _cell(peak["gradients_awaiting_reduction"], one_bucket)
            cells = [
                _cell(after["parameters"], expected["parameters"]),
                _cell(after["gradients"] + after["gradients_awaiting_reduction"], expected["gradients"]),
                _cell(counted, expected["gradients"]),
                awaiting,
                _cell(after["optimizer_state"], expected["optimizer_state"]),
            ]
            print(f"ZeRO-{stage} | {result['rank']} | " + " | ".join(cells))
    two = statistics.mean(r["step_seconds"] for r in by_stage[2])
    single = one_worker[0]["step_seconds"]
    print(
        f"ZeRO-2, {args.batch} examples per worker: 1 worker {args.batch / single:.2f} samples/s, "
        f"2 workers {2 * args.batch / two:.2f} samples/s ({single / two * 2:.2f}x)"
    )


def _cell(measured: float, expected: float) -> str:
    return f"{measured / 1e6:.1f} / {expected / 1e6:.1f} ({measured / expected:.2f}x)"


if __name__ == "__main__":
    main()
