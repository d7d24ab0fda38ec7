"""Decoding settings side by side on one digits export, judged as distributions.

For each combination of order and guidance weight, DigitsQuality's measures of the export's
samples (bottom halves completed from top halves, 8 draws each; 500 joint and 500 left-half
marginal samples), each beside its reference on the same split:

    python benchmarks/decoding.py runs/digits-quick/export --order random confidence --guidance 0 0.5 1

A BigLearn-GAN export has no decoding settings: it is scored once.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from biglearn.data.digits import DigitsQuality
from biglearn.export import load_export


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path)
    p.add_argument("--data", default="data/digits", help="the digits dataset the export was trained on")
    p.add_argument("--order", nargs="+", default=["random", "confidence"])
    p.add_argument("--guidance", nargs="+", type=float, default=[0.0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, spec = load_export(args.export)
    quality = DigitsQuality(args.data)
    print(
        "setting | accuracy of 8 draws (first draw) | same-class pairs | MMD to train | joint class TV, "
        "classes | joint MMD | nearest-train median, near copies | left-half MMD | seconds"
    )
    settings = [("generator", None)] if spec.continuous else itertools.product(args.order, args.guidance)
    for order, guidance in settings:
        start = time.perf_counter()
        if spec.continuous:
            metrics, _, _ = quality.score_generator(model, seed=args.seed)
        else:
            metrics, _, _ = quality.score(
                model,
                steps=args.steps,
                order=order,
                temperature=args.temperature,
                top_k=None,
                guidance=guidance,
                seed=args.seed,
            )
        c, j, m = metrics["conditional"], metrics["joint"], metrics["marginal_left_half"]
        name = order if guidance is None else f"{order}, guidance {guidance:g}"
        print(
            f"{name} | {c['accuracy']:.3f} ({metrics['completion_accuracy_first_draw']:.3f}) | {c['class_agreement']:.3f} | "
            f"{c['mmd_to_train']:.3f} | {j['class_tv']:.3f}, {j['classes_covered']} | {j['mmd']:.3f} | "
            f"{j['nearest_train_median']:.2f}, {j['near_copies']:.3f} | {m['mmd']:.3f} | {time.perf_counter() - start:.0f}"
        )
    print(
        f"reference | {c['accuracy_reference']:.3f} | {c['class_agreement_reference']:.3f} | "
        f"{c['mmd_to_train_reference']:.3f} | {j['class_tv_reference']:.3f}, 10 | {j['mmd_reference']:.3f} | "
        f"{j['nearest_train_median_reference']:.2f}, {j['near_copies_reference']:.3f} | {m['mmd_reference']:.3f} |"
    )


if __name__ == "__main__":
    main()
