"""`SweepConfig`: the one typed config of jobs/sweep.py, and the search space it declares.

A sweep is a base pretraining recipe (a biglearn/recipes/ YAML plus `--set`-style overrides) and a
search space over its `schedule.*`, `optim.*` and `gan.*` fields. Every value the space can produce is
checked against `PretrainConfig` before any trial starts, so a misspelt field, an empty choice
or an inverted range is refused up front rather than found in trial 7's log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from biglearn.config import Config, ConfigError, apply_overrides, load_config, validate_config
from biglearn.train.config import PretrainConfig

SEARCHABLE = ("schedule", "optim", "gan")


class Dimension(Config):
    """One searched field: exactly one of the four kinds.

    choice: [a, b, ...]    sampled uniformly;  grid: [a, b, ...]  every value, each num_samples times;
    uniform: [low, high];  loguniform: [low, high] (low > 0).
    """

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> Dimension:
        given = [kind for kind in ("choice", "grid", "uniform", "loguniform") if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, grid, uniform, loguniform (got {given or 'none'})")
        kind = given[0]
        if kind in ("choice", "grid") and not getattr(self, kind):
            raise ValueError(f"{kind} is empty: list at least one value")
        if kind in ("uniform", "loguniform"):
            low, high = getattr(self, kind)
            if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                raise ValueError(f"{kind} range [{low}, {high}]: low must be <= high (both finite)")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform range [{low}, {high}]: low must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "uniform", "loguniform") if getattr(self, k) is not None)

    def probes(self) -> list[Any]:
        """Values that stand for everything this dimension can produce (validated up front)."""
        values = getattr(self, self.kind)
        return list(values)


class AshaConfig(Config):
    """Asynchronous successive halving over checkpoints: a trial's `iteration` is its n-th
    checkpoint (each carries the objective), so trials are compared at equal training steps."""

    grace_period: PositiveInt = 1
    """Checkpoints every trial gets before it can be stopped."""
    reduction_factor: float = Field(default=2.0, gt=1)
    """Rungs lie this factor apart; each lets the best 1/reduction_factor of its trials go on."""
    brackets: PositiveInt = 1
    """ASHA brackets; bracket s puts its first rung at grace_period x reduction_factor^s.
    Each trial is assigned one at random."""


class TrialResources(Config):
    driver: dict[str, NonNegativeFloat] = {"CPU": 0, "memory": 256 * 2**20}
    """Resources of each trial's driver, which only builds the TorchTrainer and waits. Its Train
    workers ask for `cluster.num_workers` x `cluster.cpus_per_worker` (+ GPU) of the base recipe.
    No CPU: a fraction of a CPU held by a driver leaves that node short of a whole CPU for a
    Train worker or a data-reading task, which deadlocked sweeps on nodes of 1 CPU each. On a
    cluster, a custom resource only the head or on-demand nodes advertise (e.g. `train_driver: 1`)
    keeps drivers off spot nodes."""


class SweepConfig(Config):
    name: str = Field(default="digits-sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Stable sweep name: running the same command again resumes the sweep."""
    storage: str = "runs/sweeps"
    """Folder holding sweeps: <storage>/<name>/ gets Tune's state, the trials' runs and results.
    Multi-node clusters need storage every node sees."""
    base: str = "digits-quick"
    """Pretraining recipe every trial starts from: a packaged recipe's name or a YAML path."""
    overrides: list[str] = []
    """`key=value` overrides applied to the base recipe (as with --set), like train.steps=300."""
    space: dict[str, Dimension] = {}
    """Searched fields (dotted paths under schedule, optim or gan) and how each is drawn."""
    objective: str = "mean"
    """What trials are ranked by (minimised): 'mean', one panel task's name, or 'modes'. 'mean' is
    the mean panel NLL over the panel's tasks and a task's name (bottom_half, say) that task's NLL,
    scored at every checkpoint on `eval.checkpoint_panel_examples` validation examples; for a 2-D
    mixture's BigLearn-GAN, 'modes': the modes its joint samples miss."""
    panel_examples: PositiveInt = 128
    """Validation examples the objective is scored on at each checkpoint. They are the same ones
    for every trial; the panel's tasks are seeded per example, so scores compare across trials."""
    num_samples: PositiveInt = 8
    """Trials drawn (each grid point gets this many)."""
    max_concurrent_trials: PositiveInt = 2
    """Trials run at once; the rest wait."""
    seed: int = 0
    """Seed of the random search, so a sweep draws the same trials again."""
    asha: AshaConfig | None = AshaConfig()
    """null: every trial runs all its steps."""
    resources: TrialResources = TrialResources()
    address: str | None = None
    """Ray address to join; null joins RAY_ADDRESS if set, else starts a local Ray."""
    worker_start_timeout_s: float = Field(default=900.0, gt=0)
    """How long a trial's Train run waits for its workers to start (nodes being added included)."""
    max_trial_failures: int = Field(default=1, ge=0)
    """Times a failed trial is retried (it resumes its Train run from its last checkpoint)."""
    progress_every_s: float = Field(default=30.0, gt=0)
    """Seconds between progress lines (trials by state, best so far). One is also logged as each
    trial ends."""

    @model_validator(mode="after")
    def _check_space(self) -> SweepConfig:
        if not self.space:
            raise ValueError(
                "space is empty: declare at least one field to search, e.g. optim.lr: {loguniform: [1e-3, 1e-2]}"
            )
        for key in self.space:
            if key.split(".")[0] not in SEARCHABLE or key.count(".") < 1:
                raise ValueError(
                    f"space key {key!r}: only fields under {' or '.join(s + '.' for s in SEARCHABLE)} are searched"
                )
        return self


def load_sweep(path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[SweepConfig, PretrainConfig]:
    """The sweep config and its base pretraining config, with every value the space can produce
    validated against `PretrainConfig` (ConfigError names the field and the value otherwise)."""
    sweep = load_config(SweepConfig, path, overrides)
    base = base_config(sweep)
    for key, dimension in sweep.space.items():
        for value in dimension.probes():
            try:
                trial_config(base, {key: value})
            except ConfigError as exc:
                raise ConfigError(
                    f"space.{key} ({dimension.kind}) value {value!r} does not fit the base recipe {sweep.base}: {exc}"
                ) from None
    return sweep, base


def base_config(sweep: SweepConfig) -> PretrainConfig:
    try:
        return load_config(PretrainConfig, sweep.base, sweep.overrides)
    except ConfigError as exc:
        raise ConfigError(f"base recipe with overrides: {exc}") from None


def trial_config(base: PretrainConfig, values: dict[str, Any], **run: str) -> PretrainConfig:
    """`base` with `values` ({dotted key: value}) set. Overrides apply to the fully resolved base,
    so setting one family's weight keeps the rest of the mixture (a `schedule.families` mapping
    given in a recipe replaces the default mixture as a whole)."""
    data = base.to_json()
    for key, value in values.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                valid = ", ".join(sorted(node))
                raise ConfigError(f"unknown key {key!r}: no section {part!r} in the base recipe; there are: {valid}")
            node = node[part]
        if parts[-1] not in node:
            valid = ", ".join(sorted(node))
            raise ConfigError(f"unknown key {key!r}; valid keys there: {valid}")
        node[parts[-1]] = value
    data = apply_overrides(data, [f"run.{k}={v}" for k, v in run.items()])
    return validate_config(PretrainConfig, data, "trial")
