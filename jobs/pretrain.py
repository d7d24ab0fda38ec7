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
    if "completion_pairwise_distance" in summary.get("quality", {}):
        print(f"[biglearn] completions of one input differ across noise draws by "
              f"{summary['quality']['completion_pairwise_distance']:.3f} on average (L2, [0, 1] pixels; 0 if deterministic)")
    if "quality" in summary:
        refs, quality = summary["references"], summary["quality"]
        print(
            f"[biglearn] bottom-half completions classified correctly: {quality['completion_accuracy']:.3f} "
            f"(real digits {refs['real_validation']:.3f}, nearest neighbour {refs['nearest_neighbour']:.3f}, "
            f"random of 5 nearest {refs['random_of_5_nearest']:.3f}); joint samples' mean top-class "
            f"probability {quality['joint_top_class_probability']:.3f}"
        )
        if "completion_accuracy_unguided" in quality:
            print(f"[biglearn] that is with guidance {cfg.eval.guidance:g}; without it: "
                  f"{quality['completion_accuracy_unguided']:.3f}")
        print(f"[biglearn] completions: {outcome.run_folder}/completions.png")
    print(f"[biglearn] export: {outcome.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
