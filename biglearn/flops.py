"""Matmul FLOPs of the universal model, from its spec and the batch's roles.

Counts the multiply-adds of every matrix product the forward pass runs (2 FLOPs each), the way
`torch.utils.flop_counter.FlopCounterMode` counts them: linear layers, attention's two batched
products, the retrieval search and path, the summary path and the output head. Elementwise work
(norms, softmax, GELU) is left out, as it is in model FLOPs utilisation.

Attention runs over the kept positions: with `drop_absent`, a batch attends over K = the largest
number of non-absent positions in any row (shorter rows are padded to it), else over all L. A
training step costs a forward and a backward; the backward of a product costs two products
(gradients of both inputs), one where the input needs no gradient (the layers that read data).

A BigLearn-GAN step (biglearn/train/steps.py) runs more passes: G fills targets without
gradient, D learns on real and fake, R1 differentiates D's input gradient again (a double
backward), and G learns through a frozen D. `adversarial_step_flops` counts each of them by the
same rule; the orthogonal views of transformed tasks, small beside the networks, are left out.

Model FLOPs utilisation (MFU) divides achieved FLOP/s by `peak_flops`: a GPU's datasheet bf16
peak, or what this device's own matrix product reaches, measured once per process.
"""

from __future__ import annotations

import functools
import time

import torch

from biglearn.model import ModelSpec, pack_index


def attended_length(spec: ModelSpec, roles_BL: torch.Tensor) -> int:
    """K: the positions each row's blocks attend over (the pack_index rule), plus a critic's class slot."""
    keep_BK = pack_index(roles_BL)[0] if spec.model.drop_absent else None
    kept = roles_BL.shape[1] if keep_BK is None else keep_BK.shape[1]
    return kept + (1 if spec.critic else 0)


def forward_flops(spec: ModelSpec, roles_BL: torch.Tensor, memory_rows: int | None = None) -> dict[str, float]:
    """FLOPs of one forward pass over the batch, by part: {"data": products of a weight and the
    data (no gradient flows into the data in training), "model": products of a weight and
    activations, "attention": attention's products of two activations, "search": the retrieval
    search (no gradient at all)}."""
    cfg = spec.model
    rows, length = roles_BL.shape
    d = cfg.d_model
    width = spec.vocab_size or spec.patch_dim or 1  # V, or P
    kept = attended_length(spec, roles_BL)
    hidden = int(d * cfg.mlp_ratio)
    data = model = search = 0.0
    if spec.continuous:
        data += 2 * rows * length * width * d  # value_embed
    if spec.noise_dim:
        data += 2 * rows * length * spec.noise_dim * d
    if cfg.summary_width:
        features = length * width * (2 if spec.critic else 1)
        data += 2 * rows * features * cfg.summary_width
        model += 2 * rows * cfg.summary_width * d
    if cfg.retrieval_neighbours:
        examples = spec.memory_rows if memory_rows is None else memory_rows
        per_example = length * (spec.patch_dim or 1)
        search += 2 * (2 * rows * per_example * examples)  # x @ memory.T and sources @ memory².T
        data += 2 * rows * length * cfg.retrieval_neighbours * width * d
    model += cfg.num_layers * 2 * rows * kept * d * (3 * d + d + 2 * hidden)  # qkv, proj, the MLP's two layers
    attention = cfg.num_layers * 2 * 2 * rows * kept * kept * d  # scores and weighted values, over all heads
    model += 2 * rows * d * (1 if spec.critic else length * width)  # the head
    return {"data": data, "model": model, "attention": attention, "search": search}


def training_flops(spec: ModelSpec, roles_BL: torch.Tensor, memory_rows: int | None = None) -> float:
    """FLOPs of a forward and backward pass over the batch (per example: divide by its rows)."""
    parts = forward_flops(spec, roles_BL, memory_rows)
    return parts["search"] + 2 * parts["data"] + 3 * (parts["model"] + parts["attention"])


def adversarial_step_flops(
    generator: ModelSpec,
    critic: ModelSpec,
    generator_roles_BL: torch.Tensor,
    critic_roles_BL: torch.Tensor,
    r1: bool,
    memory_rows: int | None = None,
) -> float:
    """FLOPs of one BigLearn-GAN micro-step (critic step, then generator step) over the batch."""
    g = forward_flops(generator, generator_roles_BL, memory_rows)
    d = forward_flops(critic, critic_roles_BL)
    weights, attention = d["data"] + d["model"], d["attention"]
    flops = sum(g.values())  # G fills the targets, without gradient
    flops += 2 * (2 * d["data"] + 3 * (d["model"] + attention))  # D learns on real and on fake
    if r1:
        # Forward (1), input gradient (1; 2 for attention), then the backward of both: two
        # products per product of the input-gradient pass, two per forward product.
        flops += 6 * weights + 9 * attention
    flops += g["search"] + 2 * g["data"] + 3 * (g["model"] + g["attention"])  # G learns...
    flops += 2 * weights + 3 * attention  # ...through D: forward, and input gradients only (D frozen)
    return flops


# Dense bf16 peaks (no sparsity) from the vendors' datasheets, matched on the device's name in
# this order (the first whose words all occur wins: "l40s" before "l40" before "l4").
GPU_BF16_PEAKS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gb200",), 2.5e15),
    (("b200",), 2.25e15),
    (("h200", "nvl"), 836e12),
    (("h200",), 989e12),
    (("h100", "nvl"), 835e12),
    (("h100", "pcie"), 756e12),
    (("h100",), 989e12),
    (("a100",), 312e12),
    (("l40s",), 362e12),
    (("l40",), 181e12),
    (("l4",), 121e12),
    (("mi300x",), 1307e12),
)


def peak_flops(device: torch.device, bf16: bool) -> tuple[float, str]:
    """(FLOP/s, where it comes from) that MFU is measured against on `device`: a known GPU's
    datasheet bf16 peak, else what a matrix product reaches on it at the run's precision."""
    if device.type == "cuda" and bf16:
        name = torch.cuda.get_device_name(device)
        for words, flops in GPU_BF16_PEAKS:
            if all(word in name.lower() for word in words):
                return flops, f"{name} datasheet bf16 peak"
    dtype = torch.bfloat16 if bf16 else torch.float32
    threads = torch.get_num_threads()
    where = f"{threads} CPU threads" if device.type == "cpu" else str(device)
    flops = measured_matmul_flops(str(device), dtype, threads)
    return flops, f"{str(dtype).removeprefix('torch.')} matmul measured on {where}"


@functools.cache
def measured_matmul_flops(device: str, dtype: torch.dtype, threads: int) -> float:
    """The best FLOP/s of square matrix products on `device` (on CPUs with `threads`, torch's
    current thread count), over ten rounds of about 0.1 s each: the best, as a busy moment
    only lowers it."""
    n = 8192 if device.startswith("cuda") else 1024
    generator = torch.Generator(device=device).manual_seed(0)  # not the global RNG, which dropout draws from
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    out = torch.empty_like(a)

    def seconds(repeats: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        sync()
        return time.perf_counter() - start

    seconds(1)  # warm-up: kernel selection and first-touch allocation
    repeats = max(1, round(0.1 / seconds(1)))
    return max(2 * n**3 * repeats / seconds(repeats) for _ in range(10))
