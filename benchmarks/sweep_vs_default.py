"""A finished sweep's best schedule against the default one, both retrained with the same seeds.

    python benchmarks/sweep_vs_default.py --config jobs/configs/sweep-digits.yaml --seeds 0 1 2 --threads 2

"Default" is the sweep's base recipe with its overrides (what every trial started from); "best"
is <storage>/<name>/results/best.yaml. Each is trained from scratch once per seed with
`pretrain()` (Ray Train + DeepSpeed, the same code the sweep ran), and its final panel NLL (the
sweep's objective, on the evaluation's panel examples) and, for the digits, completion accuracy
are printed side by side, with mean and standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from biglearn.train.config import PretrainConfig  # noqa: E402
from biglearn.train.run import pretrain  # noqa: E402
from biglearn.tune.config import load_sweep, trial_config  # noqa: E402
from biglearn.tune.sweep import sweep_folder  # noqa: E402


def scores(summary: dict) -> dict[str, float]:
    panel = summary["panel_nll"]
    out = {"panel_mean": sum(panel.values()) / len(panel), "panel_bottom_half": panel.get("bottom_half", float("nan"))}
    if "quality" in summary:
        out["completion_accuracy"] = summary["quality"]["completion_accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the sweep YAML whose results/best.yaml is compared")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--storage", default="runs/sweep-vs-default")
    parser.add_argument("--threads", type=int, help="cluster.torch_threads of the retrained runs (one runs at a time; "
                                                    "the sweep's trials shared the machine)")
    args = parser.parse_args()

    sweep, default = load_sweep(args.config)
    best_path = Path(sweep_folder(sweep)) / "results" / "best.yaml"
    if not best_path.exists():
        sys.exit(f"error: {best_path} does not exist: run the sweep to its end first (python jobs/sweep.py --config {args.config})")
    best = PretrainConfig.model_validate(yaml.safe_load(best_path.read_text()))
    recipes = {"default": default, "best": best}

    measured: dict[str, list[dict[str, float]]] = {name: [] for name in recipes}
    for seed in args.seeds:
        for name, recipe in recipes.items():
            values = {"train.seed": seed, "eval.seed": seed, **({"cluster.torch_threads": args.threads} if args.threads else {})}
            cfg = trial_config(recipe, values,
                               name=f"{sweep.name}-{name}-seed{seed}", storage=str(Path(args.storage).resolve()))
            outcome = pretrain(cfg)
            measured[name].append(scores(outcome.summary))
            print(f"[compare] {name} seed {seed}: {measured[name][-1]}", flush=True)

    print(f"\n{sweep.name}: {len(args.seeds)} seed(s) each ({', '.join(map(str, args.seeds))}); lower NLL is better")
    keys = list(measured["default"][0])
    print(f"{'recipe':<8} " + " ".join(f"{k:>28}" for k in keys))
    for name, runs in measured.items():
        cells = []
        for key in keys:
            values = [run[key] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} +- {spread:.4f} " + "/".join(f"{v:.3f}" for v in values))
        print(f"{name:<8} " + " ".join(f"{c:>28}" for c in cells))
    for key in keys:
        ratio = statistics.mean(r[key] for r in measured["best"]) / statistics.mean(r[key] for r in measured["default"])
        print(f"best / default {key}: {ratio:.4f}")


if __name__ == "__main__":
    main()
