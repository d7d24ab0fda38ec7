"""Config loading: YAML plus `--set` overrides, with errors that say what to change."""

from __future__ import annotations

import pytest

from biglearn.config import Config, ConfigError, apply_overrides, load_config
from biglearn.roles import Family, Schedule


class Optim(Config):
    lr: float = 1e-3
    steps: int = 10
    sizes: list[int] = [1]


class Train(Config):
    name: str = "run"
    optim: Optim = Optim()


class Job(Config):
    seed: int = 0
    train: Train = Train()
    schedule: Schedule = Schedule()


def error_of(*overrides: str, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(Job, path, list(overrides))
    return str(info.value)


def test_defaults_yaml_and_overrides(tmp_path):
    assert load_config(Job) == Job()
    path = tmp_path / "job.yaml"
    path.write_text("seed: 3\ntrain:\n  optim:\n    steps: 5\n    lr: 0.5\n")
    job = load_config(Job, path, ["train.optim.steps=7", "train.name=quick"])
    assert job.seed == 3 and job.train.optim.lr == 0.5
    assert job.train.optim.steps == 7  # --set wins over the file
    assert job.train.name == "quick"


def test_set_values_are_parsed_as_yaml():
    data = {"a": {"keep": True}}
    out = apply_overrides(data, ["a.b=3", "x=[1,2]", "y=0.25", "z=hello", "w=", "a.c.d=true"])
    assert out == {"a": {"keep": True, "b": 3, "c": {"d": True}}, "x": [1, 2], "y": 0.25, "z": "hello", "w": None}
    assert type(out["a"]["b"]) is int
    assert data == {"a": {"keep": True}}  # the input is not modified
    job = load_config(Job, None, ["train.optim.sizes=[1,2]", "train.optim.steps=3"])
    assert job.train.optim.sizes == [1, 2] and job.train.optim.steps == 3


@pytest.mark.parametrize("bad", ["train.optim.steps", "=3", " =3"])
def test_malformed_set_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, [bad])


def test_set_into_a_value_is_a_config_error():
    with pytest.raises(ConfigError, match="'seed' holds a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_unknown_key_names_the_dotted_key_and_the_valid_keys():
    message = error_of("train.optim.stepz=3")
    assert "unknown key 'train.optim.stepz'" in message
    assert "valid keys here: lr, sizes, steps" in message
    message = error_of("trian.name=x")
    assert "unknown key 'trian'" in message
    assert "valid keys here: schedule, seed, train" in message


def test_unknown_key_inside_a_dict_of_models():
    message = error_of("schedule.families.conditional.weight=1", "schedule.families.conditional.wieght=1")
    assert "unknown key 'schedule.families.conditional.wieght'" in message
    assert "valid keys here: source, target, weight" in message
    message = error_of("schedule.families.span.weight=1", "schedule.families.span.target.c=2")
    assert "unknown key 'schedule.families.span.target.c'" in message
    assert "valid keys here: a, b" in message
    # an unknown family (a dict key) is named as well
    assert "bogus" in error_of("schedule.families.bogus.weight=1")


def test_wrong_value_type_names_the_key_and_the_value():
    message = error_of("train.optim.steps=many")
    assert "train.optim.steps" in message and "'many'" in message
    message = error_of("schedule.granularity=sometimes")
    assert "schedule.granularity" in message and "'sometimes'" in message
    # a model-level check (no weight > 0) comes through as a ConfigError too
    assert "weight > 0" in error_of("schedule.families.joint.weight=0")


def test_yaml_file_problems(tmp_path):
    assert "neither a file nor a packaged recipe" in error_of(path=tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    assert "not valid YAML" in error_of(path=broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert "mapping" in error_of(path=listing)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  optim:\n    lrr: 0.1\n")
    message = error_of(path=typo)
    assert str(typo) in message and "unknown key 'train.optim.lrr'" in message


def test_schedule_override_reaches_the_family_spec():
    job = load_config(Job, None, ["schedule.families.span.weight=2", "schedule.families.span.target.a=3"])
    spec = job.schedule.families[Family.span]
    assert spec.weight == 2 and spec.target.a == 3 and spec.target.b == 1


def test_a_critic_that_retrieves_is_refused():
    from biglearn.train.config import PretrainConfig

    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, None, ["gan.critic={retrieval_neighbours: 3}"])
    assert "a critic retrieves nothing" in str(info.value)
    assert load_config(PretrainConfig, None, ["model.retrieval_neighbours=3"]).model.retrieval_neighbours == 3


def test_deepspeed_ops_are_built_and_found_in_this_environment(monkeypatch):
    """However a run is launched, DeepSpeed's op cache is the environment's own (make setup builds
    into it), unless TORCH_EXTENSIONS_DIR says otherwise."""
    import os
    import sys

    from biglearn.train.engine import use_environment_extension_cache

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert use_environment_extension_cache() == os.path.join(sys.prefix, "torch_extensions")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    assert use_environment_extension_cache() == "/elsewhere"


def test_a_process_launched_from_elsewhere_reuses_the_op_make_setup_built(tmp_path):
    """The op built by `make setup` is loaded, not rebuilt, by processes started in another folder
    with another environment and PATH (as a `ray job submit` entry point or a Ray worker is):
    with the system's ninja first on PATH, then with the environment's."""
    import glob
    import os
    import subprocess
    import sys

    built = glob.glob(os.path.join(sys.prefix, "torch_extensions", "*", "*.so"))
    assert built, "make setup builds DeepSpeed's CPU op into the environment's torch_extensions"
    before = {path: os.stat(path).st_mtime_ns for path in built}
    env = {key: value for key, value in os.environ.items() if key != "TORCH_EXTENSIONS_DIR"}
    environment_bin = os.path.join(sys.prefix, "bin")
    for path in ("/usr/local/bin:/usr/bin:/bin", f"{environment_bin}:/usr/local/bin:/usr/bin:/bin"):
        subprocess.run(
            [sys.executable, "-c", "from biglearn.train.engine import build_deepspeed_ops; build_deepspeed_ops()"],
            cwd=tmp_path,
            env={**env, "HOME": str(tmp_path), "PATH": path},
            check=True,
            capture_output=True,
            timeout=300,
        )
    assert {path: os.stat(path).st_mtime_ns for path in built} == before
    assert not list(tmp_path.rglob("*.so")), "nothing was built anywhere else either"
