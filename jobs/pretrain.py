"""Pretrain a universal big-learning model with Ray Train + DeepSpeed.

    python jobs/pretrain.py                                  # quick recipe on the embedded digits
    python jobs/pretrain.py --config jobs/configs/digits-quality.yaml --set train.steps=100
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/...

Running the same command again (same run.name) resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from biglearn.config import ConfigError, job_parser, load_config
from biglearn.data.manifest import DatasetError
from biglearn.train.config import PretrainConfig
from biglearn.train.evaluate import quality_report
from biglearn.train.run import PretrainError, pretrain

DEFAULT = Path(__file__).parent / "configs" / "digits-quick.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, "recipe YAML (default: %(default)s)", "train.steps=50", str(DEFAULT))
    args = parser.parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.set)
        outcome = pretrain(cfg)
    except (ConfigError, DatasetError, PretrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    summary = outcome.summary
    if "panel_nll" in summary:
        print("\n[biglearn] panel NLL per target token (validation):")
        for task, nll in summary["panel_nll"].items():
            print(f"  {task:<14} {nll:.4f}")
    else:
        print("\n[biglearn] BigLearn-GAN panel (validation): RMS error of a sample's targets | RMS spread between two samples")
        for task, scores in summary["generator_panel"].items():
            print(f"  {task:<14} {scores['error']:.4f} | {scores['spread']:.4f}")
    if "modes" in summary:
        modes = summary["modes"]
        print(f"[biglearn] joint samples cover {modes['modes_covered']}/{modes['modes']} modes; "
              f"{modes['high_quality']:.3f} of them within 3 standard deviations of a mode")
    if "quality" in summary:
        print("\n".join(quality_report(summary, cfg.eval.guidance)))
        print(f"[biglearn] completions: {outcome.run_folder}/completions.png")
    print(f"[biglearn] export: {outcome.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
