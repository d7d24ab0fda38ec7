"""The universal model: one transformer for every p(x_T | x_S).

Each position's input is value + role + position embedding: sources show their value, targets a
learned mask embedding, absent positions nothing. With `drop_absent`, absent positions leave the
attended sequence entirely (their position ids are kept by the remaining ones), which makes
marginal tasks cheaper. With `summary_width`, every position's input also gets the output of an
MLP over all the example's sources at once (the summary path; see ModelConfig). With
`retrieval_neighbours`, it also gets what the training examples nearest to this one on its
sources hold at that position (the retrieval path, `NeighbourMemory`).

The same blocks serve three uses, chosen by the `ModelSpec`:
  * discrete tokens (`vocab_size`): token embedding in, logits over V out (maximum likelihood);
  * continuous patches (`patch_dim`): a linear patch projection in, patch values out; with
    `noise_dim` > 0 it is a generator: each target position adds its own projected Gaussian
    noise to the mask embedding, so one forward pass draws a sample (BigLearn-GAN);
  * `critic`: a discriminator over continuous patches: sources *and* targets show their values
    (real or generated), the role embedding tells which is which, and a learned class token,
    prepended to the sequence, is read out as one real-vs-fake score per example. It also
    gets a learned `view` embedding on every position of examples posed in a transformed
    domain (biglearn/gan.py), so it knows which kind of view it is judging.
Positions: one learned embedding per position, except continuous image data (a patch grid),
which gets factorised 2-D embeddings (row + column), so neighbouring patches share structure.
Discrete image tokens keep the per-position table: exports already trained that way load as
they are.

Legend: B = batch, L = positions, K = kept positions, D = model width, H = heads, E = head width,
V = vocabulary, P = patch dimension, Z = noise dimension, F = summary features per position,
N = memory rows, R = neighbours retrieved.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator
from torch import nn

from biglearn.config import Config
from biglearn.roles import ABSENT, SOURCE, TARGET

# The retrieval memory's tie order: fixed keys per value position, mixed by two 64-bit odd
# multipliers (an LCG's and a SplitMix-style step), so the order is the same in every process.
TIE_SEED = 20241205
MIX_A = 6364136223846793005
MIX_B = 1442695040888963407


# A finite stand-in for -inf outside a position's tokens: guidance's (1 + w) a - w b of two such
# logits stays finite, where -inf would give NaN; exp(-1e4) is 0 in every float type.
OUTSIDE_LOGIT = -1e4


class ModelConfig(Config):
    d_model: PositiveInt = 128
    """Width of every position's hidden vector (embeddings and blocks)."""
    num_layers: PositiveInt = 4
    """Transformer blocks."""
    num_heads: PositiveInt = 4
    """Attention heads per block; must divide d_model."""
    mlp_ratio: float = Field(default=4.0, gt=0)
    """Hidden width of each block's MLP, as a multiple of d_model."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout probability on attention weights and on each block's attention and MLP outputs."""
    drop_absent: bool = True
    """Leave absent positions out of the attended sequence, which makes marginal tasks cheaper."""
    summary_width: NonNegativeInt = 0
    """Hidden width of a global summary path over the example's sources; 0: none.
    > 0 adds a global path of this hidden width: an MLP over all the example's source values at
    once (one-hot tokens or patches, zeros elsewhere; a critic's sees its targets too, in a second
    channel) whose output joins every position's input.
    Attention has to learn to pool the sources; this path sees them all from the first layer,
    like a classifier over the raw input. On the digits it raises completion accuracy at equal
    steps but worsens the panel NLL, more so in longer runs (benchmarks/README.md). It ties the
    model to its trained length."""
    retrieval_neighbours: NonNegativeInt = 0
    """Nearest training examples (on the sources) whose values each position also gets; 0: none.
    > 0 keeps the training split in the model as a memory and gives every position, besides its
    own input, what this many memory examples hold at that position: those nearest to the
    example on its source positions (`NeighbourMemory`). In training an example never retrieves
    itself. On the digits, 5 neighbours raise completion accuracy at equal steps and lower the
    panel NLL (benchmarks/README.md). The memory is part of the
    weights and the export (a split of N examples adds N x L values) and is searched by brute
    force: for small datasets. Not for critics."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        return self


class ModelSpec(Config):
    """Everything needed to rebuild a trained model: architecture plus data shape.

    Exactly one of `vocab_size` (discrete tokens) and `patch_dim` (continuous patches)."""

    model: ModelConfig
    length: PositiveInt
    vocab_size: PositiveInt | None = None
    patch_dim: PositiveInt | None = None
    grid: tuple[int, int] | None = None
    noise_dim: NonNegativeInt = 0
    """Gaussian noise dimensions per target position: > 0 makes a generator."""
    critic: bool = False
    """A discriminator: one real-vs-fake score per example instead of values per position."""
    memory_rows: NonNegativeInt = 0
    """Examples in the retrieval memory (the training split) when model.retrieval_neighbours > 0."""
    position_vocab: list[tuple[int, int]] | None = None
    """Tokens [start, end) each position may emit (a table's columns: each its own values); the
    logits outside are pushed to OUTSIDE_LOGIT. null: every position the whole vocabulary."""
    carries_training_data: bool = False
    """Whether the weights hold training examples (the retrieval memory, `memory_rows` of them):
    whoever gets the export or its weights gets those examples. Derived from `memory_rows`."""

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if isinstance(data, dict) and "carries_training_data" not in data:
            data = {**data, "carries_training_data": bool(data.get("memory_rows", 0))}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.carries_training_data != (self.memory_rows > 0):
            raise ValueError(
                f"carries_training_data must be {self.memory_rows > 0} with memory_rows {self.memory_rows}"
            )
        if (self.vocab_size is None) == (self.patch_dim is None):
            raise ValueError("a model spec needs exactly one of vocab_size (discrete) and patch_dim (continuous)")
        if (self.noise_dim or self.critic) and self.patch_dim is None:
            raise ValueError("noise_dim and critic are for continuous data (patch_dim)")
        if self.noise_dim and self.critic:
            raise ValueError("a critic takes no generator noise: set noise_dim to 0")
        neighbours = self.model.retrieval_neighbours
        if neighbours and self.critic:
            raise ValueError("a critic retrieves nothing: set its model.retrieval_neighbours to 0")
        if neighbours and self.memory_rows <= neighbours:
            raise ValueError(
                f"model.retrieval_neighbours ({neighbours}) needs a memory of more rows than that "
                f"(memory_rows is {self.memory_rows})"
            )
        if self.grid is not None and self.grid[0] * self.grid[1] != self.length:
            raise ValueError(f"grid {self.grid} does not hold length {self.length} positions")
        if self.position_vocab is not None:
            if self.vocab_size is None or len(self.position_vocab) != self.length:
                raise ValueError("position_vocab needs tokens (vocab_size) and one [start, end) per position")
            if any(not 0 <= start < end <= self.vocab_size for start, end in self.position_vocab):
                raise ValueError(f"position_vocab ranges must lie within the vocabulary 0..{self.vocab_size - 1}")
        return self

    @property
    def continuous(self) -> bool:
        return self.patch_dim is not None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, explicit_attention: bool = False):
        super().__init__()
        self.explicit_attention = explicit_attention
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
        reduced_on_cpu = q_BHKE.device.type == "cpu" and q_BHKE.dtype in (torch.bfloat16, torch.float16)
        if self.explicit_attention or reduced_on_cpu:
            y_BHKE = _explicit_attention(q_BHKE, k_BHKE, v_BHKE, attend_B11K, dropout_p)
        else:
            y_BHKE = F.scaled_dot_product_attention(q_BHKE, k_BHKE, v_BHKE, attn_mask=attend_B11K, dropout_p=dropout_p)
        y_BKD = y_BHKE.transpose(1, 2).reshape(B, K, D)
        x_BKD = x_BKD + F.dropout(self.proj(y_BKD), self.dropout, self.training)
        return x_BKD + self.mlp(self.norm2(x_BKD))


class UniversalTransformer(nn.Module):
    """out = model(values, roles_BL[, noise_BLZ][, transformed_B]).

    Discrete: values_BL (int) -> logits_BLV. Continuous: values_BLP (float) -> patches_BLP; with
    noise_dim > 0 the noise_BLZ is required. Only outputs at TARGET positions mean anything.
    Critic: values_BLP at sources and targets -> score_B (a logit: > 0 says real);
    `transformed_B` (bool, optional) marks examples posed in a transformed domain.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        cfg = spec.model
        self.spec = spec
        d = cfg.d_model
        value_width = spec.patch_dim or spec.vocab_size  # P, or V: exactly one is set (ModelSpec._check)
        assert value_width is not None
        self.value_embed = nn.Linear(value_width, d) if spec.continuous else nn.Embedding(value_width, d)
        self.mask_embed = nn.Parameter(torch.zeros(d))
        self.role_embed = nn.Embedding(3, d)
        self.grid_positions = spec.continuous and spec.grid is not None
        if self.grid_positions:
            assert spec.grid is not None
            self.row_embed = nn.Parameter(torch.zeros(spec.grid[0], d))
            self.col_embed = nn.Parameter(torch.zeros(spec.grid[1], d))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(spec.length, d))
        if spec.noise_dim:
            self.noise_embed = nn.Linear(spec.noise_dim, d)
        if spec.critic:
            self.class_embed = nn.Parameter(torch.zeros(d))
            self.view_embed = nn.Parameter(torch.zeros(d))
        # The critic's R1 penalty differentiates its input gradient again; torch's fused
        # attention kernels have no second derivative, the written-out softmax attention has.
        self.blocks = nn.ModuleList(Block(cfg, explicit_attention=spec.critic) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1 if spec.critic else value_width)
        self.summary = None
        if cfg.summary_width:
            # A critic's path sees sources and targets in separate channels: it judges whether they agree.
            features = spec.length * value_width * (2 if spec.critic else 1)
            self.summary = nn.Sequential(
                nn.Linear(features, cfg.summary_width), nn.GELU(), nn.Linear(cfg.summary_width, d)
            )
        outside_LV = None
        if spec.position_vocab is not None:
            assert spec.vocab_size is not None  # position_vocab is for tokens (ModelSpec._check)
            tokens_V, ranges_L2 = torch.arange(spec.vocab_size), torch.tensor(spec.position_vocab)
            outside_LV = (tokens_V[None, :] < ranges_L2[:, :1]) | (tokens_V[None, :] >= ranges_L2[:, 1:])
        self.register_buffer("outside_LV", outside_LV, persistent=False)
        self.memory = None
        if cfg.retrieval_neighbours:
            self.memory = NeighbourMemory(spec, cfg.retrieval_neighbours)
        self.checkpoint_activations = False  # recompute blocks in backward: less memory, more time
        self.apply(_init_weights)
        positions = [self.row_embed, self.col_embed] if self.grid_positions else [self.pos_embed]
        critic = [self.class_embed, self.view_embed] if spec.critic else []
        for param in [*positions, self.mask_embed, *critic]:  # this order keeps discrete inits as they were
            nn.init.normal_(param, std=0.02)
        silent = [cast(nn.Linear, self.summary[-1])] if self.summary is not None else []
        if self.memory is not None:
            silent.append(self.memory.embed)
        for layer in silent:
            nn.init.zeros_(layer.weight)  # the path starts silent and grows in training
        if spec.noise_dim:
            # Noise must move the output from the first step, else the generator starts out
            # deterministic and the critic teaches it one answer per input.
            nn.init.normal_(self.noise_embed.weight, std=spec.noise_dim**-0.5)

    def positions(self) -> torch.Tensor:
        """pos_LD: the position embedding of each position (row-major over the patch grid)."""
        if self.grid_positions:
            return (self.row_embed[:, None, :] + self.col_embed[None, :, :]).flatten(0, 1)
        return self.pos_embed

    def _shown_features(self, values: torch.Tensor, roles_BL: torch.Tensor) -> torch.Tensor:
        """features_BLF for the summary path: one-hot tokens or patches at sources (and, for a
        critic, at targets in a second channel), zeros elsewhere."""
        assert self.summary is not None  # called for the summary path only
        dtype = cast(nn.Linear, self.summary[0]).weight.dtype
        if self.spec.continuous:
            features_BLF = values.to(dtype)
        else:
            assert self.spec.vocab_size is not None
            features_BLF = F.one_hot(values.long().clamp(0, self.spec.vocab_size - 1), self.spec.vocab_size).to(dtype)
        channels = [SOURCE, TARGET] if self.spec.critic else [SOURCE]
        return torch.cat([features_BLF * (roles_BL == role)[..., None].to(dtype) for role in channels], -1)

    def forward(
        self,
        values: torch.Tensor,
        roles_BL: torch.Tensor,
        noise_BLZ: torch.Tensor | None = None,
        transformed_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        spec = self.spec
        roles_BL = roles_BL.long()
        if spec.continuous:
            shown_BLD = self.value_embed(values.to(self.value_embed.weight.dtype))
        else:
            assert spec.vocab_size is not None
            shown_BLD = self.value_embed(values.long().clamp(0, spec.vocab_size - 1))
        hidden_BLD = self.mask_embed.to(shown_BLD.dtype).expand_as(shown_BLD)
        if spec.noise_dim:
            if noise_BLZ is None:
                raise ValueError("this model is a generator: pass noise_BLZ (one noise vector per position)")
            hidden_BLD = hidden_BLD + self.noise_embed(noise_BLZ.to(shown_BLD.dtype))
        is_shown_BL = roles_BL != ABSENT if spec.critic else roles_BL == SOURCE
        x_BLD = torch.where(
            is_shown_BL[..., None], shown_BLD, torch.where((roles_BL == TARGET)[..., None], hidden_BLD, 0.0)
        )
        x_BLD = x_BLD + self.role_embed(roles_BL) + self.positions()
        if self.summary is not None:
            x_BLD = x_BLD + self.summary(self._shown_features(values, roles_BL).flatten(1))[:, None, :]
        if self.memory is not None:
            x_BLD = x_BLD + self.memory(values, roles_BL).to(x_BLD.dtype)
        if spec.critic and transformed_B is not None:
            x_BLD = x_BLD + transformed_B.to(x_BLD.dtype)[:, None, None] * self.view_embed
        keep_BK, attend_B11K = None, None
        if spec.model.drop_absent:
            keep_BK, attend_B11K = pack_index(roles_BL)
        if keep_BK is not None:
            x = x_BLD.gather(1, keep_BK[..., None].expand(-1, -1, x_BLD.shape[-1]))
        else:
            x = x_BLD
        if spec.critic:
            x = torch.cat([self.class_embed.to(x.dtype).expand(x.shape[0], 1, -1), x], 1)
            if attend_B11K is not None:
                attend_B11K = F.pad(attend_B11K, (1, 0), value=True)
        for block in self.blocks:
            if self.checkpoint_activations and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, attend_B11K, use_reentrant=False)
            else:
                x = block(x, attend_B11K)
        if spec.critic:
            return self.head(self.norm(x[:, 0]))[:, 0]
        if keep_BK is not None:
            # Padding slots of keep_BK point at absent positions, whose outputs mean nothing anyway.
            x = torch.zeros_like(x_BLD).scatter(1, keep_BK[..., None].expand(-1, -1, x.shape[-1]), x)
        out = self.head(self.norm(x))
        if self.outside_LV is not None:
            out = out.masked_fill(self.outside_LV, OUTSIDE_LOGIT)
        return out


class NeighbourMemory(nn.Module):
    """The retrieval path: the training split kept as a memory of examples, read by nearest neighbours.

    An example's neighbours are the `neighbours` memory examples closest to it on its source
    positions (squared distance between values: token ids compared as numbers, which suits
    ordinal tokens such as pixel intensities; on the digits this beat counting mismatches by
    0.09 nats). Each position gets an embedding of what the neighbours hold there, nearest first
    (one-hot tokens or patches). Examples with no source get nothing: every example is as near
    as any other.

    For tokens, memory examples equally near are ordered by a pseudo-random key of the example's
    own sources (positions and values), not by their index: with few sources (the first steps of
    decoding a joint sample, a small marginal) most of the memory ties, and index order handed
    every such row the same neighbours. A row's neighbours still do not depend on the rest of its
    batch, and training meets the same order as generation. Patches keep index order among exact
    ties: a generator's samples differ by their noise, and the keyed order scored worse on the
    digits GAN (docs/results.md). In training mode the memory example equal
    to the whole example is skipped, so a training example never retrieves itself (its targets):
    the loss sees what held-out examples, which are not in the memory, will get.
    """

    examples: torch.Tensor  # buffers
    position_keys: torch.Tensor

    def __init__(self, spec: ModelSpec, neighbours: int):
        super().__init__()
        self.neighbours, self.vocab_size = neighbours, spec.vocab_size
        shape: tuple[int, ...] = (spec.memory_rows, spec.length)
        dtype = torch.long
        if spec.patch_dim is not None:  # continuous
            shape, dtype = (*shape, spec.patch_dim), torch.float32
        self.register_buffer("examples", torch.zeros(shape, dtype=dtype))
        keys = torch.randint(1, 2**31, (spec.length,), generator=torch.Generator().manual_seed(TIE_SEED))
        self.register_buffer("position_keys", keys, persistent=False)
        # Token distances are whole numbers: a tie break below 1 reorders ties only.
        self.tie_scale = 0.5 if spec.vocab_size is not None else 0.0
        value_width = spec.vocab_size or spec.patch_dim  # V, or P: exactly one is set (ModelSpec._check)
        assert value_width is not None
        self.embed = nn.Linear(neighbours * value_width, spec.model.d_model)

    def remember(self, examples: torch.Tensor) -> None:
        if examples.shape != self.examples.shape:
            raise ValueError(f"the memory holds {tuple(self.examples.shape)} values, got {tuple(examples.shape)}")
        self.examples.copy_(examples)

    def _tie_breaks(self, tokens_BL: torch.Tensor, source_BL: torch.Tensor) -> torch.Tensor:
        """u_BN in [0, 1): a pseudo-random order of the memory for each row, keyed on its sources."""
        key_B = (torch.where(source_BL, tokens_BL.long() + 1, 0) * self.position_keys).sum(1)  # int64, wraps
        index_N = torch.arange(self.examples.shape[0], device=tokens_BL.device)
        h_BN = key_B[:, None] * MIX_A + index_N * MIX_B
        h_BN = h_BN ^ ((h_BN >> 31) & ((1 << 33) - 1))
        h_BN = h_BN * MIX_A
        h_BN = h_BN ^ ((h_BN >> 29) & ((1 << 35) - 1))
        return ((h_BN >> 8) & ((1 << 24) - 1)).float() / 2**24

    def nearest(self, values: torch.Tensor, roles_BL: torch.Tensor) -> torch.Tensor:
        """index_BR: the memory examples nearest to each example on its sources, nearest first."""
        B, N = values.shape[0], self.examples.shape[0]
        memory_NF = self.examples.reshape(N, -1).float()
        source = roles_BL == SOURCE
        source_BF = (source[..., None].expand_as(values) if values.dim() == 3 else source).reshape(B, -1)
        whole_BF = values.reshape(B, -1)
        # Distances decide which examples are found: full precision, whatever autocast says.
        with torch.autocast(values.device.type, enabled=False):
            x_BF = torch.where(source_BF, whole_BF.float(), 0.0)
            distance_BN = (
                x_BF.square().sum(1, keepdim=True) - 2 * x_BF @ memory_NF.T + source_BF.float() @ memory_NF.square().T
            )
            if self.tie_scale:
                distance_BN = distance_BN + self.tie_scale * self._tie_breaks(whole_BF, source_BF)
        if not self.training:
            return distance_BN.topk(self.neighbours, dim=1, largest=False, sorted=True).indices
        # A training example is in the memory at distance 0, so among its nearest neighbours + 1
        # if anywhere: keep the first `neighbours` of those that are not the example itself.
        index_BC = distance_BN.topk(self.neighbours + 1, dim=1, largest=False, sorted=True).indices
        itself_BC = (self.examples.reshape(N, -1)[index_BC] == whole_BF.to(self.examples.dtype)[:, None, :]).all(-1)
        drop_BC = itself_BC & (itself_BC.cumsum(1) == 1)
        drop_BC[:, -1] |= ~itself_BC.any(1)
        return index_BC[~drop_BC].view(B, self.neighbours)

    def forward(self, values: torch.Tensor, roles_BL: torch.Tensor) -> torch.Tensor:
        """features_BLD"""
        found = self.examples[self.nearest(values, roles_BL)]  # [B, R, L] tokens or [B, R, L, P] patches
        if self.vocab_size is not None:
            found = F.one_hot(found, self.vocab_size)
        features_BLF = found.transpose(1, 2).flatten(2).to(self.embed.weight.dtype)
        has_source_B = (roles_BL == SOURCE).any(1)
        return self.embed(features_BLF) * has_source_B[:, None, None]


def _explicit_attention(q_BHKE, k_BHKE, v_BHKE, attend_B11K, dropout_p):
    """Softmax attention written out, for reduced precision on CPU.

    There torch's fused flash-attention backward is 3-4x slower in bfloat16 than in float32
    (at K=64, E=32), while these plain batched matmuls are faster than either; the
    softmax itself runs in float32.
    """
    scores_BHKK = (q_BHKE @ k_BHKE.transpose(-1, -2)) * q_BHKE.shape[-1] ** -0.5
    if attend_B11K is not None:
        scores_BHKK = scores_BHKK.masked_fill(~attend_B11K, float("-inf"))
    weights_BHKK = F.dropout(scores_BHKK.float().softmax(-1), dropout_p).to(v_BHKE.dtype)
    return weights_BHKK @ v_BHKE


def pack_index(roles_BL: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
