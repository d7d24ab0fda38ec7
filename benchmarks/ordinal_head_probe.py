"""Probe: ordinal output head, factorised 2-D positions and ordinal-aware value input.

Same loop and flags as benchmarks/digits_recipe.py (imported from it), plus:
    --head categorical|discretized_logistic   --mixtures K
    --positions learned|grid|grid+learned
    --value-embed table|ordinal
The variants subclass UniversalTransformer and only swap submodules in __init__, so the parent
forward (and the loss / decoding, which see log-probabilities as logits) run unchanged.

    python benchmarks/ordinal_head_probe.py --head discretized_logistic --steps 1200 --batch 64 --bf16 ...

Legend: B = batch, L = positions, K = mixture components, V = vocabulary, D = model width.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_recipe as recipe  # noqa: E402

from biglearn.data.digits import DigitsQuality, ensure_digits  # noqa: E402
from biglearn.data.manifest import read_split  # noqa: E402
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer  # noqa: E402
from biglearn.panel import evaluate_panel  # noqa: E402


class DiscretizedLogisticHead(nn.Module):
    """log p(v) over V ordered levels from a mixture of K logistics (PixelCNN++ style).

    Level v has centre c_v = -1 + 2 v / (V - 1) and bin [c_v - h, c_v + h], h = 1 / (V - 1); the
    first and last bins are open-ended. Returns log-probabilities [..., V] (valid logits).
    """

    def __init__(self, d: int, vocab_size: int, mixtures: int):
        super().__init__()
        self.K, self.V = mixtures, vocab_size
        self.proj = nn.Linear(d, 3 * mixtures)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        with torch.no_grad():  # spread the component means over the range at init
            self.proj.bias[mixtures : 2 * mixtures] = torch.linspace(-0.8, 0.8, mixtures)
            self.proj.bias[2 * mixtures :] = -1.5
        self.register_buffer("centre_V", torch.linspace(-1.0, 1.0, vocab_size), persistent=False)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        out = self.proj(x_BLD).float()
        logit_pi, mean, log_scale = out.split(self.K, dim=-1)  # [B, L, K] each
        log_scale = log_scale.clamp(min=-7.0)
        inv_s = torch.exp(-log_scale)[..., None]  # [B, L, K, 1]
        h = 1.0 / (self.V - 1)
        centred = self.centre_V - mean[..., None]  # [B, L, K, V]
        a = (centred + h) * inv_s  # upper edge
        b = (centred - h) * inv_s  # lower edge
        # log(sigmoid(a) - sigmoid(b)) = logsigmoid(a) + logsigmoid(-b) + log(1 - exp(b - a)), exact.
        mid = F.logsigmoid(a) + F.logsigmoid(-b) + torch.log(-torch.expm1(-2 * h * inv_s))
        lo = F.logsigmoid(a[..., :1])  # P(x <= c_0 + h)
        hi = F.logsigmoid(-b[..., -1:])  # P(x > c_last - h)
        logp = torch.cat([lo, mid[..., 1:-1], hi], dim=-1)
        return torch.logsumexp(logp + F.log_softmax(logit_pi, -1)[..., None], dim=-2)


class OrdinalValueEmbed(nn.Module):
    """Learned table + a learned vector times v / (V - 1)."""

    def __init__(self, vocab_size: int, d: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, d)
        self.direction = nn.Parameter(torch.randn(d) * 0.02)
        nn.init.normal_(self.table.weight, std=0.02)
        self.scale = 1.0 / (vocab_size - 1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.table(values) + (values.to(self.direction.dtype) * self.scale)[..., None] * self.direction


class ProbeTransformer(UniversalTransformer):
    def __init__(self, spec: ModelSpec, head: str, mixtures: int, positions: str, value_embed: str):
        super().__init__(spec)
        d = spec.model.d_model
        if head == "discretized_logistic":
            self.head = DiscretizedLogisticHead(d, spec.vocab_size, mixtures)
        if value_embed == "ordinal":
            self.value_embed = OrdinalValueEmbed(spec.vocab_size, d)
        self.positions = positions
        if positions != "learned":
            rows, cols = spec.grid
            self.row_embed = nn.Parameter(torch.randn(rows, d) * 0.02)
            self.col_embed = nn.Parameter(torch.randn(cols, d) * 0.02)
            self.register_buffer("row_L", torch.arange(spec.length) // cols, persistent=False)
            self.register_buffer("col_L", torch.arange(spec.length) % cols, persistent=False)
            if positions == "grid":
                del self._parameters["pos_embed"]
            else:
                nn.init.zeros_(self._parameters["pos_embed"])  # free part starts at zero

    @property
    def pos_embed(self) -> torch.Tensor:  # the parent forward reads self.pos_embed
        free = self._parameters.get("pos_embed")
        if self.positions == "learned":
            return free
        grid_LD = self.row_embed[self.row_L] + self.col_embed[self.col_L]
        return grid_LD if free is None else grid_LD + free


def main(argv=None) -> None:
    extra = argparse.ArgumentParser()
    extra.add_argument("--head", choices=["categorical", "discretized_logistic"], default="categorical")
    extra.add_argument("--mixtures", type=int, default=5)
    extra.add_argument("--positions", choices=["learned", "grid", "grid+learned"], default="learned")
    extra.add_argument("--value-embed", choices=["table", "ordinal"], default="table")
    extra.add_argument("--decode", action="append", default=None,
                       help="steps:order:temperature, repeat; default 16:confidence:1.0")
    extra.add_argument("--skip-joint", action="store_true", help="num_joint=1 in scoring (faster)")
    mine, rest = extra.parse_known_args(argv)
    args = recipe.parse_args(rest)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    manifest = ensure_digits(args.data)
    train_BL = torch.from_numpy(read_split(args.data, manifest, "train")["values"]).long()
    valid_BL = torch.from_numpy(read_split(args.data, manifest, "validation")["values"]).long()
    grid = manifest.grid
    model_cfg = ModelConfig(d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                            mlp_ratio=args.mlp_ratio, dropout=args.dropout, drop_absent=not args.no_drop_absent)
    spec = ModelSpec(model=model_cfg, length=manifest.length, vocab_size=manifest.vocab_size, grid=grid)
    model = ProbeTransformer(spec, mine.head, mine.mixtures, mine.positions, mine.value_embed)
    schedule = recipe.schedule_from(args.family)
    print("probe", json.dumps(vars(mine)))
    print("config", json.dumps({k: v for k, v in vars(args).items() if k != "family"}))
    print(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M", flush=True)
    train_seconds = 0.0
    if args.load:
        model.load_state_dict(torch.load(args.load))
    else:
        train_seconds = recipe.train(model, schedule, train_BL, valid_BL, grid, args)
        if args.save:
            torch.save(model.state_dict(), args.save)
    print(f"train wall {train_seconds:.1f}s threads={args.threads}", flush=True)
    panel = evaluate_panel(model, valid_BL, grid)
    print("final panel(8 steps)", json.dumps({k: round(v, 4) for k, v in panel.items()}), flush=True)
    quality = DigitsQuality(args.data)
    for text in mine.decode or ["16:confidence:1.0"]:
        steps, order, temperature = text.split(":")
        start = time.perf_counter()
        metrics, _, _ = quality.score(model, steps=int(steps), order=order, temperature=float(temperature),
                                      top_k=None, num_joint=1 if mine.skip_joint else 200)
        print(f"quality steps={steps} order={order} T={temperature}: acc={metrics['completion_accuracy']:.4f} "
              f"({time.perf_counter() - start:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
