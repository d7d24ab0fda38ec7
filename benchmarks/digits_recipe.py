"""Hand-run recipe search on the embedded digits: train the universal model, then score it.

A plain-PyTorch loop over the core modules (sample_roles -> UniversalTransformer ->
big_learning_loss), AdamW with linear warmup then cosine decay to a floor, grad clipping 1.0.
Prints train loss, the validation panel NLL and, at the end, DigitsQuality's measures (bottom
halves completed from top halves, joint samples judged as a distribution; each beside its
reference in parentheses) plus wall time.

    python benchmarks/digits_recipe.py --steps 3000 --d-model 128 --layers 4 --threads 1

Schedule flags take "family:weight[:ta,tb[:sa,sb]]" (target / source Beta parameters), e.g.
--family conditional:0.5:1,1:4,1 --family half:0.3.

Legend: B = batch, L = positions, V = vocabulary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch

from biglearn.data.digits import DigitsQuality, ensure_digits
from biglearn.data.manifest import read_split
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer
from biglearn.objectives import big_learning_loss, family_means
from biglearn.panel import evaluate_panel
from biglearn.roles import FAMILIES, Beta, Family, FamilySpec, Schedule, sample_roles


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/digits")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    # model
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--no-drop-absent", action="store_true")
    p.add_argument("--summary-width", type=int, default=0, help="the summary path's hidden width (0 = off)")
    p.add_argument("--retrieval", type=int, default=0, help="neighbours retrieved from the training split (0 = off)")
    p.add_argument(
        "--bf16", action="store_true", help="train under bfloat16 autocast (weights and optimizer stay float32)"
    )
    # schedule and loss
    p.add_argument(
        "--family",
        action="append",
        default=None,
        help="family:weight[:ta,tb[:sa,sb]]; repeat; default = the Schedule defaults",
    )
    p.add_argument("--weighting", choices=["inverse_ratio", "uniform"], default="inverse_ratio")
    # optimisation
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.05)
    # reporting and decoding
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--decode-steps", type=int, nargs="+", default=[16])
    p.add_argument("--order", nargs="+", default=["confidence"])
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    p.add_argument("--top-k", type=int, nargs="+", default=[0], help="0 = no top-k")
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0], help="guidance weights (0 = none)")
    p.add_argument("--save", default=None, help="write the state dict here")
    p.add_argument("--load", default=None, help="skip training: load this state dict and only score")
    return p.parse_args(argv)


def schedule_from(specs: list[str] | None) -> Schedule:
    if not specs:
        return Schedule()
    families = {}
    for text in specs:
        parts = text.split(":")
        spec = {"weight": float(parts[1])}
        for key, part in zip(("target", "source"), parts[2:]):
            a, b = (float(x) for x in part.split(","))
            spec[key] = Beta(a=a, b=b)
        families[Family(parts[0])] = FamilySpec(**spec)
    return Schedule(families=families)


def lr_at(step: int, args: argparse.Namespace, total: int) -> float:
    """Linear warmup, then cosine decay from lr to min_lr_ratio * lr over the remaining steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    floor = args.min_lr_ratio
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    manifest = ensure_digits(args.data)
    train_BL = torch.from_numpy(read_split(args.data, manifest, "train")["values"]).long()
    valid_BL = torch.from_numpy(read_split(args.data, manifest, "validation")["values"]).long()
    grid = manifest.grid
    model_cfg = ModelConfig(
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        mlp_ratio=args.mlp_ratio,
        dropout=args.dropout,
        drop_absent=not args.no_drop_absent,
        summary_width=args.summary_width,
        retrieval_neighbours=args.retrieval,
    )
    spec = ModelSpec(
        model=model_cfg,
        length=manifest.length,
        vocab_size=manifest.vocab_size,
        grid=grid,
        memory_rows=len(train_BL) if args.retrieval else 0,
    )
    model = UniversalTransformer(spec)
    if args.retrieval:
        model.memory.remember(train_BL)
    schedule = schedule_from(args.family)
    print("config", json.dumps({k: v for k, v in vars(args).items() if k != "family"}))
    print("schedule", schedule.model_dump_json())
    print(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M")

    train_seconds = 0.0
    if args.load:
        model.load_state_dict(torch.load(args.load, weights_only=True))
    else:
        train_seconds = train(model, schedule, train_BL, valid_BL, grid, args)
        if args.save:
            torch.save(model.state_dict(), args.save)

    panel = evaluate_panel(model, valid_BL, grid)
    print("final panel", json.dumps({k: round(v, 4) for k, v in panel.items()}))
    quality = DigitsQuality(args.data)
    grid_of_decodings = itertools.product(args.decode_steps, args.order, args.temperature, args.top_k, args.guidance)
    for steps, order, temperature, top_k, guidance in grid_of_decodings:
        start = time.perf_counter()
        metrics, _, _ = quality.score(
            model, steps=steps, order=order, temperature=temperature, top_k=top_k or None, guidance=guidance
        )
        joint, conditional = metrics["joint"], metrics["conditional"]
        print(
            f"quality steps={steps} order={order} T={temperature} top_k={top_k} guidance={guidance}: "
            f"acc={conditional['accuracy']:.4f} (reference {conditional['accuracy_reference']:.4f}) "
            f"agreement={conditional['class_agreement']:.4f} ({conditional['class_agreement_reference']:.4f}) "
            f"joint TV={joint['class_tv']:.4f} ({joint['class_tv_reference']:.4f}) "
            f"MMD={joint['mmd']:.4f} ({joint['mmd_reference']:.4f}) near_copies={joint['near_copies']:.3f} "
            f"({time.perf_counter() - start:.1f}s)"
        )
    print(f"train wall {train_seconds:.1f}s threads={args.threads}")


def train(model, schedule, train_BL, valid_BL, grid, args) -> float:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    data_generator = torch.Generator().manual_seed(args.seed)
    roles_generator = torch.Generator().manual_seed(args.seed + 1)
    L = train_BL.shape[1]
    stats_F2 = torch.zeros(len(FAMILIES), 2)
    loss_sum, loss_count = 0.0, 0
    model.train()
    start = time.perf_counter()
    step = 0
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args, args.steps)
        index_B = torch.randint(0, len(train_BL), (args.batch,), generator=data_generator)
        values_BL = train_BL[index_B]
        roles_BL, family_B = sample_roles(schedule, args.batch, L, roles_generator, grid)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits_BLV = model(values_BL, roles_BL)
        loss, step_stats_F2 = big_learning_loss(logits_BLV, values_BL, roles_BL, family_B, args.weighting)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        stats_F2 += step_stats_F2
        loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
        elapsed = time.perf_counter() - start
        last = step + 1 == args.steps or (args.time_budget is not None and elapsed > args.time_budget)
        if (step + 1) % args.eval_every == 0 or last:
            means = {k: round(v, 3) for k, v in family_means(stats_F2).items()}
            eval_start = time.perf_counter()
            panel = evaluate_panel(model, valid_BL, grid, steps=4)
            eval_seconds = time.perf_counter() - eval_start
            start += eval_seconds  # evaluation time does not count as training time
            print(
                f"step {step + 1} loss {loss_sum / loss_count:.4f} lr {lr_at(step, args, args.steps):.2e} "
                f"{elapsed:.0f}s ({elapsed / (step + 1):.3f}s/step) families {means}"
            )
            print(f"  valid panel(4 steps) {json.dumps({k: round(v, 3) for k, v in panel.items()})}", flush=True)
            stats_F2.zero_()
            loss_sum, loss_count = 0.0, 0
        if last:
            break
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
