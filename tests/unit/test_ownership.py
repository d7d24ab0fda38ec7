"""A run's config: a re-run under the same name must train what the run trains."""

from __future__ import annotations

import json

import pytest

from biglearn.config import load_config
from biglearn.train.config import PretrainConfig
from biglearn.train.ownership import RunBusyError, check_same_config


def config(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, ["data.path=/data/digits", *overrides])


def test_a_rerun_with_another_training_config_is_refused_unless_changes_are_asked_for(tmp_path):
    run = str(tmp_path / "G")
    check_same_config(config(), run)
    check_same_config(config("eval.draws=4", "train.faults=[{kind: kill, step: 3}]", "cluster.max_failures=2"), run)

    with pytest.raises(RunBusyError) as refused:
        check_same_config(config("train.seed=1", "optim.lr=0.01"), run)
    message = str(refused.value)
    assert "optim.lr: 0.001 -> 0.01" in message and "train.seed: 0 -> 1" in message
    assert "another run.name" in message and "run.resume_with_changes=true" in message
    assert json.loads((tmp_path / "G" / "config.json").read_text())["train"]["seed"] == 0  # untouched

    check_same_config(config("train.seed=1", "run.resume_with_changes=true"), run)
    assert json.loads((tmp_path / "G" / "config.json").read_text())["train"]["seed"] == 1
    [kept] = tmp_path.glob("G/config.*.json")
    assert json.loads(kept.read_text())["train"]["seed"] == 0


def test_keys_a_saved_config_lacks_count_as_their_defaults(tmp_path):
    """A run saved by an older version, before a key existed, resumes if the key keeps its default."""
    (tmp_path / "G").mkdir()
    saved = config().to_json()
    del saved["data"]["embedded_root"]
    (tmp_path / "G" / "config.json").write_text(json.dumps(saved))
    check_same_config(config(), str(tmp_path / "G"))
    with pytest.raises(RunBusyError, match="data.embedded_root: data -> elsewhere"):
        check_same_config(config("data.embedded_root=elsewhere"), str(tmp_path / "G"))


def test_a_mapping_given_as_a_whole_is_compared_as_given(tmp_path):
    families = "schedule.families={joint: {weight: 0.5}, marginal: {weight: 0.5}}"
    check_same_config(config(families), str(tmp_path / "G"))
    check_same_config(config(families), str(tmp_path / "G"))
    with pytest.raises(RunBusyError, match=r"schedule.families.box.weight: \(absent\) -> 0.05"):
        check_same_config(config(), str(tmp_path / "G"))
