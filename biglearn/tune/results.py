"""What a finished sweep leaves for a person: the trial table (CSV + Parquet), the best schedule
as a ready-to-run pretraining recipe, and a plot (objective over time; objective per knob)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from ray.tune import ResultGrid  # noqa: E402

from biglearn.train.config import PretrainConfig  # noqa: E402
from biglearn.train.evaluate import MIXTURE_SAMPLES  # noqa: E402
from biglearn.tune.config import SweepConfig, trial_config  # noqa: E402
from biglearn.tune.sweep import objective_metric  # noqa: E402

TABLE = "trials"
BEST = "best.yaml"
PLOT = "sweep.png"
SCORES = ("panel_", "modes_", "high_quality")
"""Prefixes of the scores a checkpoint reports: the panel's NLLs, or a mixture GAN's mode coverage."""


@dataclass
class SweepSummary:
    table: pd.DataFrame
    best: dict[str, Any] | None
    """The best finished trial's row (None when no trial ran all its steps)."""
    folder: Path


def write_results(grid: ResultGrid, sweep: SweepConfig, base: PretrainConfig, folder: Path) -> SweepSummary:
    folder.mkdir(parents=True, exist_ok=True)
    metric = objective_metric(sweep)
    rows, curves = [], []
    for result in grid:
        history = result.metrics_dataframe
        last = result.metrics or {}
        trial_id = last.get("trial_id") or Path(result.path).name
        step = last.get("step", 0)
        status = "error" if result.error else ("finished" if step >= base.train.steps else "stopped early")
        row = {"trial": trial_id, "status": status, **{k: (result.config or {}).get(k) for k in sweep.space}}
        row.update(
            objective=last.get(metric, math.nan),
            step=step,
            checkpoints=last.get("training_iteration", 0),
            seconds=last.get("time_total_s", math.nan),
        )
        row.update({k: v for k, v in last.items() if k.startswith(SCORES)})
        rows.append(row)
        if history is not None and metric in history:
            curves.append((trial_id, status, history["timestamp"].to_numpy(), history[metric].to_numpy()))
    table = ranked(pd.DataFrame(rows))
    table.to_csv(folder / f"{TABLE}.csv", index=False)
    table.to_parquet(folder / f"{TABLE}.parquet", index=False)

    finished = table[table.status == "finished"]
    best = finished.iloc[0].to_dict() if len(finished) else None
    if best is not None:
        _write_best(folder / BEST, sweep, base, best, metric)
    _plot(folder / PLOT, sweep, table, curves, metric)
    return SweepSummary(table=table, best=best, folder=folder)


def ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Finished trials first, then by objective; ties go to the lower trial id, so the best
    trial does not depend on the order Tune lists them in (it changes when a sweep resumes)."""
    return table.sort_values(["status", "objective", "trial"], key=_finished_first, kind="stable").reset_index(
        drop=True
    )


def _finished_first(column: pd.Series) -> pd.Series:
    if column.name == "status":
        return column.map({"finished": 0, "stopped early": 1, "error": 2})
    return column


def _write_best(path: Path, sweep: SweepConfig, base: PretrainConfig, best: dict, metric: str) -> None:
    values = {key: _plain(best[key]) for key in sweep.space}
    cfg = trial_config(base, values, name=f"{sweep.name}-best", storage=base.run.storage)
    searched = "\n".join(f"#   {key}: {value!r}" for key, value in values.items())
    header = (
        f"# Best schedule of sweep {sweep.name} (trial {best['trial']}): {metric} {best['objective']:.4f} on "
        f"{_scored_on(sweep)}\n"
        f"# at step {best['step']}, the lowest of the trials that ran all their steps. Searched values:\n{searched}\n"
        f"#   command:  python jobs/pretrain.py --config {path}\n"
        f"#   hardware, time: as the sweep's base recipe {sweep.base} (the same steps and workers)\n"
    )
    path.write_text(header + yaml.safe_dump(cfg.to_json(), sort_keys=False))


def _scored_on(sweep: SweepConfig) -> str:
    if sweep.objective == "modes":
        return f"{MIXTURE_SAMPLES} joint samples"
    return f"{sweep.panel_examples} validation examples"


def _plain(value: Any) -> Any:
    """numpy scalars from the table -> plain Python values for YAML."""
    return value.item() if hasattr(value, "item") else value


def _plot(path: Path, sweep: SweepConfig, table: pd.DataFrame, curves: list, metric: str) -> None:
    knobs = list(sweep.space)
    fig, axes = plt.subplots(1, 1 + len(knobs), figsize=(5 * (1 + len(knobs)), 4), squeeze=False)
    axes = axes[0]
    start = min((times.min() for _, _, times, _ in curves), default=0)
    colour = {"finished": "tab:blue", "stopped early": "tab:orange", "error": "tab:red"}
    for _trial, status, times, values in curves:
        axes[0].plot((times - start) / 60, values, marker="o", ms=3, color=colour[status], alpha=0.8)
    axes[0].set(
        xlabel="minutes since the sweep started",
        ylabel=f"{metric} ({_scored_on(sweep)}; lower is better)",
        title="objective per trial at each checkpoint",
    )
    axes[0].plot([], [], color="tab:blue", label="finished")
    axes[0].plot([], [], color="tab:orange", label="stopped early (ASHA)")
    axes[0].legend(fontsize=8)
    for ax, knob in zip(axes[1:], knobs):
        for status, group in table.groupby("status"):
            x = group[knob]
            if not pd.api.types.is_numeric_dtype(x):
                x = x.astype(str)
            # pandas types group keys as Hashable; these are status names.
            ax.scatter(x, group["objective"], color=colour[cast(str, status)], label=status)
        if sweep.space[knob].kind == "loguniform":
            ax.set_xscale("log")
        ax.set(xlabel=knob, ylabel=f"last {metric}", title=f"objective against {knob}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
