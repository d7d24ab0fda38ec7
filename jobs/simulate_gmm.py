"""The paper's Gaussian-mixture simulations (method.md sections 3-4), on CPU in minutes.

    python jobs/simulate_gmm.py --config jobs/configs/gmm25-published.yaml   # the authors' schedule
    python jobs/simulate_gmm.py --config jobs/configs/gmm25-joint.yaml       # joint-only baseline
    python jobs/simulate_gmm.py --config jobs/configs/gmm25-ours.yaml        # our schedule
    python jobs/simulate_gmm.py --config jobs/configs/gmm2-landscape.yaml    # 2-GMM landscapes
    python jobs/simulate_gmm.py --config jobs/configs/gmm25-published.yaml \\
        --set gmm25.seeds=[1,2,3] --set gmm25.outer_steps=2000 --set output=runs/try

Each run writes config.json, a PNG (fit.png or landscape.png) and results.json (last) into
`output`. Exit status 2: a config that cannot be used (the message says which key and why).
"""

from __future__ import annotations

import sys

from biglearn.config import ConfigError, job_parser, load_config
from biglearn.simulate.run import SimulateConfig, simulate


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, "YAML recipe (jobs/configs/gmm*.yaml)", "gmm25.outer_steps=2000").parse_args(argv)
    try:
        cfg = load_config(SimulateConfig, args.config, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # --- run ---
    try:
        result = simulate(cfg, log=lambda line: print(line, flush=True))
    except OSError as exc:
        print(f"error: cannot write {cfg.output}: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    # --- summary ---
    if cfg.experiment == "gmm25":
        print("seed    modes  reverse KL (se)    forward KL (se)")
        for run in result["per_seed"]:
            print(
                f"{run['seed']:<7} {run['modes_covered']:>2}/25  {run['reverse_kl']:7.3f} ({run['reverse_kl_se']:.3f})"
                f"   {run['forward_kl']:7.3f} ({run['forward_kl_se']:.3f})"
            )
        print(f"median modes covered {result['median_modes_covered']:g}; wall {result['wall_seconds']:.0f}s")
    else:
        print(f"collapsed minimum {result['collapsed_point']}; wall {result['wall_seconds']:.0f}s")
    print(f"[biglearn] results in {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
