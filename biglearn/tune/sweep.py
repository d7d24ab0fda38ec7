"""Ray Tune over pretraining: each trial is a driver that runs `biglearn.train.run.pretrain`
(Ray Train + DeepSpeed) with its sampled schedule/optimiser values, and forwards the panel NLL
reported with every checkpoint to Tune, where ASHA stops the trials that lag.

Layout of <storage>/<name>/: Tune's experiment state and trial folders, `runs/<trial>/` (each
trial's Train run: checkpoints, export, summary.json), and `results/` (written by
`biglearn.tune.results` once the sweep ends).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.tune as tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from biglearn.config import ConfigError
from biglearn.data.storage import absolute, join
from biglearn.panel import panel_tasks
from biglearn.train.config import PretrainConfig
from biglearn.train.evaluate import is_mixture
from biglearn.train.run import connect, prepare_data, pretrain, with_absolute_paths
from biglearn.tune.config import Dimension, SweepConfig, trial_config

RUNS = "runs"


def objective_metric(sweep: SweepConfig) -> str:
    if sweep.objective == "modes":
        return "modes_missed"
    return "panel_mean" if sweep.objective == "mean" else f"panel_{sweep.objective}"


def sweep_folder(sweep: SweepConfig) -> str:
    return join(absolute(sweep.storage), sweep.name)


def checkpoints_per_trial(cfg: PretrainConfig) -> int:
    """Reports (iterations, for ASHA) of a full trial: every checkpoint_every steps and the last."""
    return -(-cfg.train.steps // cfg.train.checkpoint_every)


def run_trial(values: dict[str, Any], base: dict, runs_root: str, panel_examples: int) -> None:
    """One trial: the base recipe with `values`, trained under a name fixed by the trial id, so a
    retried or resumed trial continues its own Train run from its last checkpoint."""
    cfg = trial_config(
        PretrainConfig.model_validate(base),
        {**values, "eval.checkpoint_panel_examples": panel_examples},
        name=f"trial-{tune.get_context().get_trial_id()}",
        storage=runs_root,
    )
    pretrain(cfg, callbacks=[TuneReportCallback()])


def run_sweep(sweep: SweepConfig, base: PretrainConfig, log: Callable[[str], None] = print) -> tune.ResultGrid:
    """Runs (or resumes, when `<storage>/<name>` holds its state) the sweep; returns Tune's results."""
    manifest = prepare_data(base)  # once here, not racing in every trial
    base = with_absolute_paths(base)  # trials run in folders of Tune's
    if is_mixture(manifest) != (sweep.objective == "modes"):
        raise ConfigError(
            f"objective {sweep.objective!r} does not fit {manifest.name} ({manifest.kind}): 'modes' is the objective of a "
            "2-D mixture's BigLearn-GAN, which reports no panel NLL; other data take 'mean' or a panel task"
        )
    tasks = panel_tasks(manifest.length, manifest.grid)
    if sweep.objective not in ("mean", "modes") and sweep.objective not in tasks:
        raise ConfigError(
            f"objective {sweep.objective!r} is not a panel task of this data; use mean or one of {', '.join(tasks)}"
        )
    # Ray Train's default 60 s wait for a worker group restarts over and over while an autoscaler
    # boots nodes (minutes) or a busy machine starts worker processes.
    connect(
        base.cluster.model_copy(update={"address": sweep.address}),
        env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(sweep.worker_start_timeout_s)},
    )
    folder = sweep_folder(sweep)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=base.to_json(), runs_root=join(folder, RUNS), panel_examples=sweep.panel_examples
        ),
        dict(sweep.resources.driver),
    )
    if tune.Tuner.can_restore(folder):
        log(f"[sweep] {sweep.name}: resuming from {folder} (finished trials keep their results)")
        tuner = tune.Tuner.restore(folder, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(sweep.space),
            tune_config=_tune_config(sweep, base),
            run_config=_run_config(sweep, base, log),
        )
    log(
        f"[sweep] {sweep.name}: {sweep.num_samples} sample(s) over {', '.join(sweep.space)}; "
        f"objective {objective_metric(sweep)} (min); up to {sweep.max_concurrent_trials} trial(s) at once; in {folder}"
    )
    return tuner.fit()


def _param_space(space: dict[str, Dimension]) -> dict[str, Any]:
    draw = {
        "choice": lambda d: tune.choice(d.choice),
        "grid": lambda d: tune.grid_search(d.grid),
        "uniform": lambda d: tune.uniform(*d.uniform),
        "loguniform": lambda d: tune.loguniform(*d.loguniform),
    }
    return {key: draw[dimension.kind](dimension) for key, dimension in space.items()}


def _tune_config(sweep: SweepConfig, base: PretrainConfig) -> tune.TuneConfig:
    scheduler = None
    if sweep.asha is not None:
        scheduler = ResumableASHA(
            time_attr="training_iteration",
            max_t=checkpoints_per_trial(base),
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
            brackets=sweep.asha.brackets,
        )
    return tune.TuneConfig(
        metric=objective_metric(sweep),
        mode="min",
        num_samples=sweep.num_samples,
        scheduler=scheduler,
        search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials),
    )


def _run_config(sweep: SweepConfig, base: PretrainConfig, log: Callable[[str], None]) -> tune.RunConfig:
    return tune.RunConfig(
        name=sweep.name,
        storage_path=absolute(sweep.storage),
        failure_config=tune.FailureConfig(max_failures=sweep.max_trial_failures),
        callbacks=[SweepProgress(objective_metric(sweep), base.train.steps, sweep.progress_every_s, log)],
        verbose=0,
    )


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive a resumed sweep. Tune saves no scheduler state, so after a restore
    plain ASHA compares new trials only with each other (the first to reach a rung always goes
    on); here each restored trial's reported results (its result.json) are replayed into its
    bracket as Tune adds it, and later trials are held to what the earlier ones reached."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not trial.has_reported_at_least_once:
            return  # a new trial (it has no folder yet)
        bracket = self._trial_info[trial.trial_id]
        assert trial.path is not None  # a trial that reported has its folder
        for result in reported_results(trial.path):
            if self._time_attr in result and self._metric in result:
                bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])


def reported_results(trial_folder: str) -> list[dict]:
    """The results a trial reported before the sweep was interrupted; a last line cut short by
    the interruption is skipped."""
    path = Path(trial_folder) / "result.json"
    if not path.is_file():
        return []
    results = []
    for line in path.read_text().splitlines():
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return results


class SweepProgress(tune.Callback):
    """Logs trials running/pending/done and the best so far, with the cluster's node count (the
    autoscaler's doing), every `every_s` seconds and whenever a trial ends."""

    def __init__(self, metric: str, total_steps: int, every_s: float, log: Callable[[str], None]):
        self.metric, self.total_steps, self.every_s, self.log = metric, total_steps, every_s, log
        self.last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info):
        if time.monotonic() - self.last >= self.every_s:
            self._report(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        self._report(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        self._report(trials)

    def _report(self, trials: list) -> None:
        self.last = time.monotonic()
        states = Counter(trial.status for trial in trials)
        stopped = sum(
            1
            for trial in trials
            if trial.status == "TERMINATED"
            and (trial.last_result or {}).get("step", self.total_steps) < self.total_steps
        )
        scored = [(t.last_result[self.metric], t) for t in trials if self.metric in (t.last_result or {})]
        best = "none yet"
        if scored:
            value, trial = min(scored, key=lambda pair: pair[0])
            shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
            best = (
                f"{self.metric} {value:.4f} at step {trial.last_result.get('step')} (trial {trial.trial_id}: {shown})"
            )
        nodes = [node for node in ray.nodes() if node["Alive"]]
        cpus = sum(node["Resources"].get("CPU", 0) for node in nodes)
        self.log(
            f"[sweep] {states['RUNNING']} running, {states['PENDING']} pending, {states['TERMINATED']} done "
            f"({stopped} stopped early by ASHA), {states['ERROR']} errored | best {best} | "
            f"{len(nodes)} node(s), {cpus:g} CPU"
        )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
