"""DeepSpeed engines built from PretrainConfig: ZeRO 1/2/3, fp32 + gloo on CPU, bf16 + NCCL on GPU."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from biglearn.train.config import PretrainConfig

# One tag for every save: Ray Train gives each checkpoint its own folder already.
TAG = "ds"


def cpu_bf16(precision: str) -> bool:
    """Whether CPU work runs under bf16 autocast: asked for, or 'auto' on CPUs with native bf16."""
    if precision == "auto":
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(probe and probe())
    return precision == "bf16"


def computes_in_bf16(precision: str, on_gpu: bool) -> bool:
    """Whether the run's products run in bf16: on GPUs unless fp32 is asked for (DeepSpeed's
    bf16), on CPUs by `cpu_bf16`."""
    return precision != "fp32" if on_gpu else cpu_bf16(precision)


def autocast(device: torch.device, precision: str):
    """bf16 autocast for CPU work (weights and optimizer stay fp32); on GPUs DeepSpeed's bf16
    mode casts the model instead, so this is a no-op there."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=device.type == "cpu" and cpu_bf16(precision))


def deepspeed_config(cfg: PretrainConfig, on_gpu: bool, lr: float | None = None) -> dict:
    """`lr` overrides optim.lr (the GAN's critic); everything else comes from the config."""
    optim = cfg.optim
    # Contiguous gradients spare GPU allocators fragmentation; on CPU they are one more copy of
    # every gradient per step (2-3% of a digits step, benchmarks/README.md).
    zero: dict = {
        "stage": cfg.cluster.zero_stage,
        "contiguous_gradients": on_gpu,
        "reduce_bucket_size": cfg.cluster.zero_bucket_elements,
    }
    if cfg.cluster.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": optim.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu and computes_in_bf16(cfg.train.precision, on_gpu)},
        # torch's AdamW: DeepSpeed's fused/CPU Adam would need compiled ops on every node.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr or optim.lr,
                "betas": list(optim.betas),
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": cfg.train.steps,
                "warmup_num_steps": min(optim.warmup_steps, cfg.train.steps),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": optim.min_lr_ratio,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def use_environment_extension_cache() -> str:
    """Where DeepSpeed compiles and finds its CPU ops: TORCH_EXTENSIONS_DIR if set, else a folder
    of this Python environment (set here, so every process of a run uses it, however launched).
    Also puts the environment's own ninja (pip's, a DeepSpeed dependency) first on PATH.

    torch's default is one folder per user, shared by every environment: two checkouts (or a
    run and `make setup`) with different environments then rebuild the op over each other's
    build (a minute or more each, holding a lock). Likewise two ninja versions (the system's,
    found by `make setup`, and the environment's, first on PATH in a Ray job) read each other's
    build log as invalid, drop it, and rebuild."""
    bin_dir = os.path.join(sys.prefix, "bin")
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bin_dir, "ninja")) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def build_deepspeed_ops() -> None:
    """Compiles DeepSpeed's CPU communication op now (`make setup`), not in the first run."""
    use_environment_extension_cache()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def build_engine(model: torch.nn.Module, cfg: PretrainConfig, on_gpu: bool, lr: float | None = None):
    use_environment_extension_cache()
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model,
        # Annotated as a Module, but an iterable of parameters is what DeepSpeed documents and takes.
        model_parameters=model.parameters(),  # pyright: ignore[reportArgumentType]
        config=deepspeed_config(cfg, on_gpu, lr),
    )
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The unsharded weights (a collective under ZeRO-3: every rank must call it)."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` summed over all ranks (a collective when there are several)."""
    tensor = tensor.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor
