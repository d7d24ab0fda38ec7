"""Resuming a sweep: ResumableASHA knows what the trials before the interruption reached, and the
results rank trials the same whatever order Tune lists them in."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
from ray.tune.schedulers import TrialScheduler

from biglearn.tune.results import ranked
from biglearn.tune.sweep import ResumableASHA


def restored_trial(
    folder: Path, trial_id: str, objectives: list[float], cut_last_line: bool = False
) -> SimpleNamespace:
    folder.mkdir(parents=True)
    lines = [json.dumps({"training_iteration": i + 1, "panel_mean": value}) for i, value in enumerate(objectives)]
    text = "\n".join(lines) + "\n"
    if cut_last_line:
        text += '{"training_iteration": 9, "panel_me'
    (folder / "result.json").write_text(text)
    return SimpleNamespace(trial_id=trial_id, path=str(folder), has_reported_at_least_once=True)


class NewTrial:
    """A trial not started before the interruption: Tune has given it no folder yet."""

    has_reported_at_least_once = False

    def __init__(self, trial_id: str):
        self.trial_id = trial_id

    @property
    def path(self) -> str:
        raise RuntimeError("Should not access `trial_fs_path` without setting `trial_dir_name`")


def scheduler() -> ResumableASHA:
    asha = ResumableASHA(time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2)
    asha.set_search_properties(metric="panel_mean", mode="min")
    return asha


def test_a_laggard_after_a_resume_is_stopped_against_the_restored_trials(tmp_path):
    asha = scheduler()
    asha.on_trial_add(None, restored_trial(tmp_path / "good", "good", [2.5, 2.3, 2.2, 2.1], cut_last_line=True))
    asha.on_trial_add(None, restored_trial(tmp_path / "fair", "fair", [2.6, 2.4]))
    laggard = NewTrial("laggard")
    asha.on_trial_add(None, laggard)
    # The first trial to reach a rung in a plain (fresh) ASHA would always go on.
    assert asha.on_trial_result(None, laggard, {"training_iteration": 1, "panel_mean": 2.85}) == TrialScheduler.STOP

    leader = NewTrial("leader")
    asha.on_trial_add(None, leader)
    assert asha.on_trial_result(None, leader, {"training_iteration": 1, "panel_mean": 2.4}) == TrialScheduler.CONTINUE


def test_without_history_it_is_plain_asha(tmp_path):
    asha = scheduler()
    first = NewTrial("first")
    asha.on_trial_add(None, first)
    assert asha.on_trial_result(None, first, {"training_iteration": 1, "panel_mean": 9.0}) == TrialScheduler.CONTINUE


def test_tied_trials_rank_the_same_in_any_listed_order():
    rows = [
        {"trial": "t_00002", "status": "finished", "objective": 4.0},
        {"trial": "t_00003", "status": "stopped early", "objective": 1.0},
        {"trial": "t_00000", "status": "finished", "objective": 4.0},
        {"trial": "t_00001", "status": "finished", "objective": 9.0},
        {"trial": "t_00004", "status": "error", "objective": float("nan")},
    ]
    expected = ["t_00000", "t_00002", "t_00001", "t_00003", "t_00004"]
    for order in (rows, rows[::-1], rows[2:] + rows[:2]):
        assert ranked(pd.DataFrame(order)).trial.tolist() == expected
