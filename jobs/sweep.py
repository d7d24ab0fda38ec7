"""Search the (S, T) sampling schedule and optimiser of pretraining with Ray Tune (+ ASHA).

    python jobs/sweep.py --config jobs/configs/sweep-digits.yaml
    python jobs/sweep.py --config jobs/configs/sweep-digits.yaml --set num_samples=4 --set name=try
    ray job submit --working-dir . -- python jobs/sweep.py --config ... --set storage=/mnt/shared/sweeps

Each trial is a full pretraining run (Ray Train + DeepSpeed) of the base recipe with the sampled
values. Running the same command again (same name) resumes an interrupted sweep: finished trials
keep their results. Results land in <storage>/<name>/results/: trials.csv, trials.parquet,
best.yaml (ready for jobs/pretrain.py) and sweep.png. Exit status 2: a config or search space
that cannot be used (nothing is started).
"""

from __future__ import annotations

import sys
from pathlib import Path

from biglearn.config import ConfigError, job_parser
from biglearn.data.manifest import DatasetError
from biglearn.train.run import PretrainError
from biglearn.tune.config import load_sweep
from biglearn.tune.results import SCORES, write_results
from biglearn.tune.sweep import objective_metric, run_sweep, sweep_folder


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, "sweep YAML (jobs/configs/sweep-*.yaml)", "num_samples=4").parse_args(argv)
    try:
        sweep, base = load_sweep(args.config, args.set)
        if "://" in sweep.storage:
            raise ConfigError("storage: sweeps write their results locally; give a folder (shared by all nodes)")
        # --- sweep ---
        grid = run_sweep(sweep, base, log=lambda line: print(line, flush=True))
    except (ConfigError, DatasetError, PretrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # --- results ---
    summary = write_results(grid, sweep, base, Path(sweep_folder(sweep)) / "results")
    print(f"\n[sweep] {len(summary.table)} trial(s): {summary.table.status.value_counts().to_dict()}")
    print(summary.table.drop(columns=[c for c in summary.table if c.startswith(SCORES)]).to_string(index=False))
    if summary.best is None:
        print("[sweep] no trial ran all its steps: no best schedule written", file=sys.stderr)
        return 1
    print(f"[sweep] best: trial {summary.best['trial']}, {objective_metric(sweep)} {summary.best['objective']:.4f}")
    print(f"[sweep] best schedule: {summary.folder / 'best.yaml'} (python jobs/pretrain.py --config ...)")
    print(f"[sweep] table: {summary.folder / 'trials.csv'}, plot: {summary.folder / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
