"""Matmul FLOPs of the universal model, from its spec and the batch's roles.

Counts the multiply-adds of every matrix product the forward pass runs (2 FLOPs each), the way
`torch.utils.flop_counter.FlopCounterMode` counts them: linear layers, attention's two batched
products, the retrieval search and path, the summary path and the output head. Elementwise work
(norms, softmax, GELU) is left out, as it is in model FLOPs utilisation.

Attention runs over the kept positions: with `drop_absent`, a batch attends over K = the largest
number of non-absent positions in any row (shorter rows are padded to it), else over all L. A
training step costs a forward and a backward; the backward of a product costs two products
(gradients of both inputs), one where the input needs no gradient (the layers that read data).
"""

from __future__ import annotations

import torch

from biglearn.model import ModelSpec, pack_index


def attended_length(spec: ModelSpec, roles_BL: torch.Tensor) -> int:
    """K: the positions each row's blocks attend over (the pack_index rule), plus a critic's class slot."""
    keep_BK = pack_index(roles_BL)[0] if spec.model.drop_absent else None
    kept = roles_BL.shape[1] if keep_BK is None else keep_BK.shape[1]
    return kept + (1 if spec.critic else 0)


def forward_flops(spec: ModelSpec, roles_BL: torch.Tensor, memory_rows: int | None = None) -> dict[str, float]:
    """FLOPs of one forward pass over the batch, by part: {"data": products whose input is data
    (no gradient flows into it), "model": every other product, "search": the retrieval search
    (no gradient at all)}."""
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
    per_layer = 2 * rows * kept * d * (3 * d + d + 2 * hidden)  # qkv, proj, the MLP's two layers
    per_layer += 2 * 2 * rows * kept * kept * d  # scores and weighted values, over all heads
    model += cfg.num_layers * per_layer
    model += 2 * rows * d * (1 if spec.critic else length * width)  # the head
    return {"data": data, "model": model, "search": search}


def training_flops(spec: ModelSpec, roles_BL: torch.Tensor, memory_rows: int | None = None) -> float:
    """FLOPs of a forward and backward pass over the batch (per example: divide by its rows)."""
    parts = forward_flops(spec, roles_BL, memory_rows)
    return parts["search"] + 2 * parts["data"] + 3 * parts["model"]
