"""The universal model: one transformer for every p(x_T | x_S).

Each position's input is value + role + position embedding: sources show their value, targets a
learned mask embedding, absent positions nothing. With `drop_absent`, absent positions leave the
attended sequence entirely (their position ids are kept by the remaining ones), which makes
marginal tasks cheaper.

Legend: B = batch, L = positions, K = kept positions, D = model width, H = heads, E = head width,
V = vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from biglearn.config import Config
from biglearn.roles import ABSENT, SOURCE, TARGET


class ModelConfig(Config):
    d_model: PositiveInt = 128
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 4
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    drop_absent: bool = True

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        return self


class ModelSpec(Config):
    """Everything needed to rebuild a trained model: architecture plus data shape."""

    model: ModelConfig
    length: PositiveInt
    vocab_size: PositiveInt
    grid: tuple[int, int] | None = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d), nn.Dropout(cfg.dropout))

    def forward(self, x_BKD: torch.Tensor, attend_B11K: torch.Tensor | None) -> torch.Tensor:
        B, K, D = x_BKD.shape
        qkv_BK3HE = self.qkv(self.norm1(x_BKD)).view(B, K, 3, self.num_heads, D // self.num_heads)
        q_BHKE, k_BHKE, v_BHKE = qkv_BK3HE.permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.dropout if self.training else 0.0
        if q_BHKE.device.type == "cpu" and q_BHKE.dtype in (torch.bfloat16, torch.float16):
            y_BHKE = _explicit_attention(q_BHKE, k_BHKE, v_BHKE, attend_B11K, dropout_p)
        else:
            y_BHKE = F.scaled_dot_product_attention(q_BHKE, k_BHKE, v_BHKE, attn_mask=attend_B11K, dropout_p=dropout_p)
        y_BKD = y_BHKE.transpose(1, 2).reshape(B, K, D)
        x_BKD = x_BKD + F.dropout(self.proj(y_BKD), self.dropout, self.training)
        return x_BKD + self.mlp(self.norm2(x_BKD))


class UniversalTransformer(nn.Module):
    """logits_BLV = model(values_BL, roles_BL); only logits at TARGET positions mean anything."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        cfg = spec.model
        self.spec = spec
        d = cfg.d_model
        self.value_embed = nn.Embedding(spec.vocab_size, d)
        self.mask_embed = nn.Parameter(torch.zeros(d))
        self.role_embed = nn.Embedding(3, d)
        self.pos_embed = nn.Parameter(torch.zeros(spec.length, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, spec.vocab_size)
        self.checkpoint_activations = False  # recompute blocks in backward: less memory, more time
        self.apply(_init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_embed, std=0.02)

    def forward(self, values_BL: torch.Tensor, roles_BL: torch.Tensor) -> torch.Tensor:
        roles_BL = roles_BL.long()
        shown_BLD = self.value_embed(values_BL.long().clamp(0, self.spec.vocab_size - 1))
        x_BLD = torch.where(
            (roles_BL == SOURCE)[..., None],
            shown_BLD,
            torch.where((roles_BL == TARGET)[..., None], self.mask_embed.to(shown_BLD.dtype), 0.0),
        )
        x_BLD = x_BLD + self.role_embed(roles_BL) + self.pos_embed
        keep_BK, attend_B11K = None, None
        if self.spec.model.drop_absent:
            keep_BK, attend_B11K = _pack_index(roles_BL)
        if keep_BK is not None:
            x = x_BLD.gather(1, keep_BK[..., None].expand(-1, -1, x_BLD.shape[-1]))
        else:
            x = x_BLD
        for block in self.blocks:
            if self.checkpoint_activations and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, attend_B11K, use_reentrant=False)
            else:
                x = block(x, attend_B11K)
        if keep_BK is not None:
            # Padding slots of keep_BK point at absent positions, whose logits mean nothing anyway.
            x = torch.zeros_like(x_BLD).scatter(1, keep_BK[..., None].expand(-1, -1, x.shape[-1]), x)
        return self.head(self.norm(x))


def _explicit_attention(q_BHKE, k_BHKE, v_BHKE, attend_B11K, dropout_p):
    """Softmax attention written out, for reduced precision on CPU.

    There torch's fused flash-attention backward is 3-4x slower in bfloat16 than in float32
    (measured at K=64, E=32), while these plain batched matmuls are faster than either; the
    softmax itself runs in float32.
    """
    scores_BHKK = (q_BHKE @ k_BHKE.transpose(-1, -2)) * q_BHKE.shape[-1] ** -0.5
    if attend_B11K is not None:
        scores_BHKK = scores_BHKK.masked_fill(~attend_B11K, float("-inf"))
    weights_BHKK = F.dropout(scores_BHKK.float().softmax(-1), dropout_p).to(v_BHKE.dtype)
    return weights_BHKK @ v_BHKE


def _pack_index(roles_BL: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Indices of the non-absent positions of each row (first K = max count), and the key mask.

    Returns (None, None) when no position is absent, and (None, key mask) when some row keeps
    all L positions.
    """
    absent_BL = roles_BL == ABSENT
    if not absent_BL.any():
        return None, None
    count_B = (~absent_BL).sum(1)
    K = int(count_B.max())
    if K == roles_BL.shape[1]:
        # Some row keeps every position, so packing shortens nothing: mask absent keys instead.
        return None, (~absent_BL)[:, None, None, :]
    keep_BK = absent_BL.to(torch.uint8).argsort(dim=1, stable=True)[:, :K]
    if bool((count_B == K).all()):
        return keep_BK, None
    attend_B11K = (torch.arange(K, device=roles_BL.device) < count_B[:, None])[:, None, None, :]
    return keep_BK, attend_B11K


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
