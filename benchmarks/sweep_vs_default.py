"""A finished sweep's best schedule against the default one, both retrained with the same seeds.

    python benchmarks/sweep_vs_default.py --config biglearn/recipes/sweep-digits.yaml --seeds 0 1 2 --threads 2
    python benchmarks/sweep_vs_default.py --config biglearn/recipes/sweep-gmm25.yaml \
        --also biglearn/recipes/gmm25-gan-joint.yaml --seeds 0 1 2 --threads 1

"Default" is the sweep's base recipe with its overrides (what every trial started from); "best"
is <storage>/<name>/results/best.yaml; `--also` adds recipes of your own (the sweep's overrides
applied to them too, e.g. the joint-only GAN). Each is trained from scratch once per seed with
`pretrain()` (Ray Train + DeepSpeed, the same code the sweep ran), and its final scores are
printed side by side, with mean and standard deviation over the seeds: panel NLL (the sweep's
objective, on the evaluation's panel examples) and, for the digits, completion accuracy; for a
mixture's GAN, the modes its joint samples cover and their share near a mode.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from biglearn.config import load_config  # noqa: E402
from biglearn.train.config import PretrainConfig  # noqa: E402
from biglearn.train.run import pretrain  # noqa: E402
from biglearn.tune.config import load_sweep, trial_config  # noqa: E402
from biglearn.tune.sweep import sweep_folder  # noqa: E402


def scores(summary: dict) -> dict[str, float]:
    if "modes" in summary:  # a mixture's GAN: more is better
        return {"modes_covered": summary["modes"]["modes_covered"], "high_quality": summary["modes"]["high_quality"]}
    panel = summary["panel_nll"]
    out = {"panel_mean": sum(panel.values()) / len(panel), "panel_bottom_half": panel.get("bottom_half", float("nan"))}
    if "quality" in summary:
        out["completion_accuracy"] = summary["quality"]["completion_accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the sweep YAML whose results/best.yaml is compared")
    parser.add_argument(
        "--also",
        nargs="+",
        default=[],
        metavar="CONFIG",
        help="more pretraining recipes to train beside them (the sweep's overrides applied)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--storage", default="runs/sweep-vs-default")
    parser.add_argument(
        "--threads",
        type=int,
        help="cluster.torch_threads of the retrained runs (one runs at a time; the sweep's trials shared the machine)",
    )
    args = parser.parse_args()

    sweep, default = load_sweep(args.config)
    best_path = Path(sweep_folder(sweep)) / "results" / "best.yaml"
    if not best_path.exists():
        sys.exit(
            f"error: {best_path} does not exist: run the sweep to its end first (python jobs/sweep.py --config {args.config})"
        )
    best = PretrainConfig.model_validate(yaml.safe_load(best_path.read_text()))
    recipes = {"default": default, "best": best}
    recipes.update({Path(path).stem: load_config(PretrainConfig, path, sweep.overrides) for path in args.also})

    measured: dict[str, list[dict[str, float]]] = {name: [] for name in recipes}
    for seed in args.seeds:
        for name, recipe in recipes.items():
            values = {
                "train.seed": seed,
                "eval.seed": seed,
                **({"cluster.torch_threads": args.threads} if args.threads else {}),
            }
            cfg = trial_config(
                recipe, values, name=f"{sweep.name}-{name}-seed{seed}", storage=str(Path(args.storage).resolve())
            )
            outcome = pretrain(cfg)
            measured[name].append(scores(outcome.summary))
            print(f"[compare] {name} seed {seed}: {measured[name][-1]}", flush=True)

    print(
        f"\n{sweep.name}: {len(args.seeds)} seed(s) each ({', '.join(map(str, args.seeds))}); "
        "lower NLL, higher accuracy and more modes covered are better"
    )
    keys = list(measured["default"][0])
    width = max(8, *map(len, recipes))
    print(f"{'recipe':<{width}} " + " ".join(f"{k:>28}" for k in keys))
    for name, runs in measured.items():
        cells = []
        for key in keys:
            values = [run[key] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} +- {spread:.4f} " + "/".join(f"{v:.3f}" for v in values))
        print(f"{name:<{width}} " + " ".join(f"{c:>28}" for c in cells))
    for name in [n for n in recipes if n != "default"]:
        for key in keys:
            ratio = statistics.mean(r[key] for r in measured[name]) / statistics.mean(
                r[key] for r in measured["default"]
            )
            print(f"{name} / default {key}: {ratio:.4f}")


if __name__ == "__main__":
    main()
