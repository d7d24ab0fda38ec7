"""Sweeps end to end: jobs/sweep.py on a local autoscaling cluster (Ray's fake multi-node
provider), every trial a Ray Train + DeepSpeed pretraining run; ASHA, results, resumption after
the driver is killed, scale-up and scale-down; and the bad search spaces refused up front."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from biglearn import cli
from biglearn.data.prepare import write_source
from biglearn.data.sources import GmmInput, GmmSource
from tests.integration.conftest import wait_for
from tests.integration.fake_cluster import FakeAutoscalingCluster

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ray

TINY = [
    "model.d_model=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "optim.batch_size=32",
    "optim.warmup_steps=2",
    "train.steps=8",
    "train.log_every=4",
    "train.checkpoint_every=4",
    "cluster.torch_threads=1",
    "eval.panel_examples=16",
    "eval.panel_steps=2",
    "eval.decode_steps=2",
    "eval.num_joint=4",
    "eval.num_shown=4",
]


def sweep_config(path: Path, digits: str, **fields) -> Path:
    config = {
        "name": "tiny",
        "storage": str(path.parent / "sweeps"),
        "base": str(REPO / "biglearn/recipes/digits-quick.yaml"),
        # Relative to the repository, where the sweep runs: trials and their Train workers run in
        # folders of Tune's and Train's own, so the sweep must hand them absolute paths.
        "overrides": [f"data.path={os.path.relpath(digits, REPO)}", f"run.storage={path.parent / 'runs'}", *TINY],
        # One hopeless learning rate against a good one: ASHA has something to stop.
        "space": {"optim.lr": {"grid": [1.0e-6, 3.0e-3]}, "schedule.families.half.weight": {"uniform": [0.2, 0.5]}},
        "panel_examples": 32,
        "num_samples": 2,
        "max_concurrent_trials": 2,
        "progress_every_s": 5,
        **fields,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "space, expected",
    [
        ({"optim.lrr": {"choice": [0.1]}}, ["space.optim.lrr", "unknown key 'optim.lrr'", "warmup_steps"]),
        ({"optim.lr": {"choice": []}}, ["space.optim.lr", "choice is empty"]),
        ({"optim.lr": {"uniform": [0.01, 0.001]}}, ["space.optim.lr", "low must be <= high"]),
        ({"schedule.granularity": {"choice": ["example", "sometimes"]}}, ["'sometimes'", "schedule.granularity"]),
        ({"model.d_model": {"grid": [64, 128]}}, ["model.d_model", "only fields under schedule. or optim."]),
    ],
)
def test_bad_search_space_is_refused_before_any_trial(tmp_path, digits, capsys, space, expected):
    config = sweep_config(tmp_path / "sweep.yaml", digits, space=space)
    assert cli.sweep(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    for fragment in expected:
        assert fragment in err
    assert "Traceback" not in err
    assert not (tmp_path / "sweeps").exists(), "nothing may start or be written for a space that cannot run"


NODE_RECORDER = """
import sys, time, ray
ray.init(address=sys.argv[1])
start = time.monotonic()
while True:
    print(round(time.monotonic() - start, 1), sum(1 for node in ray.nodes() if node["Alive"]), flush=True)
    time.sleep(1)
"""


def node_counts(path: Path) -> list[tuple[float, int]]:
    """(seconds, alive nodes) as sampled every second by the recorder process."""
    samples = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            samples.append((float(parts[0]), int(parts[1])))
    return samples


def terminated_trials(folder: Path) -> set[str]:
    """Trials Tune's own saved experiment state records as finished."""
    done = set()
    for state in folder.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (json.JSONDecodeError, KeyError):
            continue  # being rewritten
        for trial_json, _ in trials:
            trial = json.loads(trial_json)
            if trial["status"] == "TERMINATED":
                done.add(trial["trial_id"])
    return done


@pytest.mark.timeout(
    2700
)  # two sweep attempts and a training run; the default 1200 s ran out on a loaded 2-core machine
def test_sweep_scales_cluster_resumes_after_kill_and_writes_results(tmp_path, digits):
    cluster = FakeAutoscalingCluster(worker_cpus=1, max_workers=2, idle_timeout_s=5).start()
    # Ray reads the auth settings once per process: everything talking to this cluster is a
    # subprocess started with them.
    env = {**os.environ, **cluster.env}
    counts = tmp_path / "nodes.txt"
    recorder = subprocess.Popen(
        [sys.executable, "-c", NODE_RECORDER, cluster.address],
        env=env,
        stdout=open(counts, "w"),
        stderr=subprocess.DEVNULL,
    )
    trained = None
    try:
        config = sweep_config(tmp_path / "sweep.yaml", digits, address=cluster.address)
        command = [sys.executable, str(REPO / "jobs/sweep.py"), "--config", str(config)]
        folder = tmp_path / "sweeps" / "tiny"

        # --- first attempt: killed once Tune has saved a finished trial ---
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)

            # A trial ASHA stopped is TERMINATED too; wait for one that ran all its steps.
            def finished_trials() -> list[str]:
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                return [
                    t for t in terminated_trials(folder) if (folder / "runs" / f"trial-{t}" / "step-00000008").exists()
                ]

            finished = wait_for(
                finished_trials, 1200, "a trial that ran all its steps in the saved sweep state", every_s=2
            )
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        kept = finished[0]
        kept_run = folder / "runs" / f"trial-{kept}"
        kept_checkpoints = sorted(p.name for p in kept_run.glob("step-*"))
        kept_snapshot = (kept_run / "checkpoint_manager_snapshot.json").read_bytes()
        assert kept_checkpoints, f"finished trial {kept} left no checkpoints in {kept_run}"

        # --- the same command again: resumes ---
        second = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
        (tmp_path / "second.log").write_text(second.stdout + second.stderr)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "resuming" in second.stdout
        # The finished trial was not re-run: its Train run has the same checkpoints and record.
        assert sorted(p.name for p in kept_run.glob("step-*")) == kept_checkpoints
        assert (kept_run / "checkpoint_manager_snapshot.json").read_bytes() == kept_snapshot

        # --- results ---
        results = folder / "results"
        table = pd.read_csv(results / "trials.csv")
        pd.testing.assert_frame_equal(table, pd.read_parquet(results / "trials.parquet"), check_dtype=False)
        assert len(table) == 4 and set(table.trial) >= {kept}
        assert {"optim.lr", "schedule.families.half.weight", "objective", "panel_bottom_half", "status"} <= set(table)
        assert (table.status == "stopped early").sum() >= 1, table
        assert (table.status == "finished").sum() >= 1, table
        stopped = table[table.status == "stopped early"]
        assert (stopped.step < 8).all()
        # ASHA compares a trial with those already at its rung, so which trials it stops depends on
        # their arrival order (a good trial arriving after a better one is stopped too); what it
        # guarantees is that the first good trial at the rung goes on and finishes best.
        best = table[table.status == "finished"].sort_values("objective").iloc[0]
        assert best["optim.lr"] == 3e-3 and (stopped.objective > best.objective).all()
        png = (results / "sweep.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

        # --- the best schedule is a ready-to-run pretraining recipe (trained on a local Ray of
        # its own while the autoscaler removes the sweep's idle nodes) ---
        ended = node_counts(counts)[-1][0]
        best_yaml = results / "best.yaml"
        assert yaml.safe_load(best_yaml.read_text())["optim"]["lr"] == 3e-3
        with open(tmp_path / "best.log", "w") as best_log:  # the child keeps its own copy of the handle
            trained = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "jobs/pretrain.py"),
                    "--config",
                    str(best_yaml),
                    "--set",
                    "train.steps=4",
                    "--set",
                    f"run.storage={tmp_path / 'best'}",
                ],
                stdout=best_log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

        # --- scale-up while trials waited, scale-down once the sweep ended ---
        # Idle timeout 5 s, but each Train run's autoscaling request (Ray Train V2, fixed 180 s
        # expiry) outlives a run whose controller went without cancelling it.
        wait_for(lambda: node_counts(counts)[-1][1] == 1, 300, "the idle worker nodes to be removed", every_s=2)
        samples = node_counts(counts)
        changes = [s for i, s in enumerate(samples) if i == 0 or s[1] != samples[i - 1][1]]
        print(f"node counts (seconds, alive nodes) at each change: {changes}; the sweep ended at {ended:.0f} s")
        assert samples[0][1] == 1 and max(n for _, n in samples) == 3  # from the head alone to head + the 2 allowed

        assert trained.wait(600) == 0, (tmp_path / "best.log").read_text()[-3000:]
        assert (tmp_path / "best" / "tiny-best" / "export" / "model.safetensors").exists()
    finally:
        if trained is not None and trained.poll() is None:
            trained.kill()
        recorder.kill()
        cluster.stop()


@pytest.fixture(scope="module")
def gmm25(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("data") / "gmm25")
    write_source(
        GmmSource(GmmInput(kind="gmm", num_examples=4000)),
        path,
        name="gmm25",
        validation_fraction=0.1,
        seed=0,
        rows_per_shard=4000,
    )
    return path


GMM_TINY = [
    "model.d_model=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "gan.noise_dim=4",
    "optim.batch_size=64",
    "optim.warmup_steps=2",
    "train.steps=6",
    "train.log_every=3",
    "train.checkpoint_every=3",
    "cluster.torch_threads=1",
]


def gmm_sweep_config(path: Path, data: str, **fields) -> Path:
    gmm = {
        "base": str(REPO / "biglearn/recipes/gmm25-gan-biglearn.yaml"),
        "overrides": [f"data.path={data}", f"run.storage={path.parent / 'runs'}", *GMM_TINY],
        "space": {"gan.transform_probability": {"grid": [0.0, 0.5]}},
        "objective": "modes",
        "asha": None,
        "num_samples": 1,
    }
    return sweep_config(path, data, **{**gmm, **fields})


@pytest.mark.parametrize("data, objective", [("digits", "modes"), ("gmm25", "mean")])
def test_objective_that_does_not_fit_the_data_is_refused(tmp_path, request, capsys, data, objective):
    make = gmm_sweep_config if data == "gmm25" else sweep_config
    config = make(tmp_path / "sweep.yaml", request.getfixturevalue(data), objective=objective)
    assert cli.sweep(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"objective '{objective}' does not fit" in err and "Traceback" not in err


def test_gmm_gan_sweep_is_scored_by_the_modes_its_samples_miss(tmp_path, gmm25):
    config = gmm_sweep_config(tmp_path / "sweep.yaml", gmm25)
    swept = subprocess.run(
        [sys.executable, str(REPO / "jobs/sweep.py"), "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1200,
    )
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    table = pd.read_csv(tmp_path / "sweeps" / "tiny" / "results" / "trials.csv")
    assert len(table) == 2 and (table.status == "finished").all(), table
    assert sorted(table["gan.transform_probability"]) == [0.0, 0.5]
    # K - covered, of the 25 modes, at the last checkpoint; the same figure as modes_missed.
    assert table.objective.between(0, 25).all() and (table.objective == table.modes_missed).all()
    assert (table.objective == table.objective.round()).all()
    assert {"modes_covered", "high_quality"} <= set(table)
    best = yaml.safe_load((tmp_path / "sweeps" / "tiny" / "results" / "best.yaml").read_text())
    assert best["gan"]["transform_probability"] in (0.0, 0.5)
