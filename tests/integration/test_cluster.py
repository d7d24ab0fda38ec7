"""Jobs on a multi-node Ray cluster on this machine (cluster/local.py: a head without CPUs and four
1-CPU worker nodes, token auth on): `ray job submit` with and without the token, Train workers on
several nodes, training metrics on the metrics port, and a worker node lost mid-run with a
half-written checkpoint left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from biglearn.export import load_export
from biglearn.train.progress import TRAIN_METRICS
from tests.integration.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from cluster.local import LocalCluster  # noqa: E402

pytestmark = pytest.mark.ray

STEP_LINE = re.compile(r"\[biglearn\] step (\d+)/")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = time.monotonic()
    # Four: after one is lost, the two Train workers take two and the third rebuilds the lost
    # node's share of the materialized dataset (with none spare, the restarted run waits forever).
    cluster = LocalCluster.up(tmp_path_factory.mktemp("local-cluster"), workers=4, object_store_mb=150, timeout_s=600)
    print(f"\n[test] local cluster up (head + 4 workers) in {time.monotonic() - started:.0f} s")
    yield cluster
    cluster.down()
    assert not cluster.processes(), "down left processes of this cluster running"


def pretrain_args(digits: str, storage: Path, name: str, *extra: str) -> list[str]:
    sets = [arg for item in tiny_overrides(digits, storage, name, *extra) for arg in ("--set", item)]
    return ["python", "jobs/pretrain.py", *sets]


def test_job_with_token_trains_on_two_nodes_and_without_token_is_refused(cluster, digits, tmp_path):
    workers = {node.node_id for node in cluster.nodes if node.name != "head"}
    env = {**os.environ, **cluster.env()}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    submit = [ray_cli, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO), "--"]

    job = subprocess.run(
        [*submit, *pretrain_args(digits, tmp_path, "submitted")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    summary = json.loads((tmp_path / "submitted" / "summary.json").read_text())
    assert summary["train"]["final_step"] == 12
    [placement] = summary["placements"]
    assert len(set(placement)) == 2 and set(placement) <= workers, "the two ranks should run on two worker nodes"
    model, spec = load_export(tmp_path / "submitted" / "export")
    assert spec.length == 64 and sum(p.numel() for p in model.parameters()) > 0

    # The same submission without the token, by the CLI and over plain HTTP, with a wrong token.
    anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}
    refused = subprocess.run(
        [*submit, "echo", "pwned"], env=anonymous, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and "Unauthorized" in refused.stdout + refused.stderr
    jobs_api = f"{cluster.dashboard_url}/api/jobs/"
    assert requests.post(jobs_api, json={"entrypoint": "echo pwned"}, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 64}
    assert requests.post(jobs_api, json={"entrypoint": "echo pwned"}, headers=wrong, timeout=30).status_code in (
        401,
        403,
    )
    listed = requests.get(jobs_api, headers=cluster.auth_headers(), timeout=30).json()
    assert [j["entrypoint"] for j in listed if "pwned" in j["entrypoint"]] == [], "a refused job was created"


def test_lost_worker_node_resumes_on_the_others_from_last_committed_checkpoint(cluster, digits, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_headers())
    steps, every = 40, 4
    entrypoint = pretrain_args(
        digits,
        tmp_path,
        "lost-node",
        f"train.steps={steps}",
        f"train.checkpoint_every={every}",
        "cluster.max_failures=1",
    )
    job = client.submit_job(entrypoint=" ".join(entrypoint), runtime_env={"working_dir": str(REPO)})
    run = tmp_path / "lost-node"

    def logged_steps() -> list[int]:
        return [int(m) for m in STEP_LINE.findall(client.get_job_logs(job))]

    def committed_steps() -> list[int]:
        snapshot = run / "checkpoint_manager_snapshot.json"
        return sorted({int(s) for s in re.findall(r"step-(\d{8})", snapshot.read_text())}) if snapshot.exists() else []

    # Wait for a committed checkpoint and a step beyond it, scraping the training metrics meanwhile.
    exported: set[str] = set()
    deadline = time.monotonic() + 600
    while not (committed_steps() and max(logged_steps(), default=0) > committed_steps()[-1]):
        assert client.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(job)[-3000:]
        assert time.monotonic() < deadline, "no checkpoint committed in time"
        exported |= scraped_train_metrics(cluster)
        time.sleep(0.5)
    while not exported >= {f"ray_{name}" for name in TRAIN_METRICS} and time.monotonic() < deadline:
        exported |= scraped_train_metrics(cluster)
        time.sleep(1)
    assert exported >= {f"ray_{name}" for name in TRAIN_METRICS}, f"exported only {sorted(exported)}"

    victim = worker_node_of_a_train_worker(cluster)
    cluster.kill_node(victim.name)
    lost_at = time.monotonic()
    committed_at_loss = committed_steps()[-1]
    steps_before = len(logged_steps())
    assert committed_at_loss < steps, "the run ended before the node was lost; make it longer"
    # A save cut short leaves a step folder Ray never committed: here one beyond any save that
    # can have been in flight, with a state claiming that step and a truncated DeepSpeed shard.
    half_written = committed_at_loss + 2 * every
    plant_half_written_checkpoint(run, committed_at_loss, half_written)

    resumed_in = None
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        logs = client.get_job_logs(job)
        if resumed_in is None and "resumed from step" in logs and len(STEP_LINE.findall(logs)) > steps_before:
            after = logs.split("resumed from step", 1)[1]
            if STEP_LINE.search(after):
                resumed_in = time.monotonic() - lost_at
        assert time.monotonic() < deadline + 600, "the run did not finish after the node loss"
        time.sleep(0.25)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    [resumed] = summary["train"]["resumes"]
    # The last committed checkpoint: the one seen at the loss, or the next if both ranks had
    # reported it just before; never the half-written folder.
    assert resumed in (committed_at_loss, committed_at_loss + every) and resumed != half_written
    assert f"resumed from step {resumed}/{steps}" in logs
    assert resumed_in is not None, "no training progress was seen after the restart"
    print(
        f"\n[test] node {victim.name} lost at step {max(STEP_LINE.findall(logs)[:steps_before], key=int)} "
        f"(last committed checkpoint {committed_at_loss}, resumed from {resumed}); training progressed "
        f"again {resumed_in:.1f} s after the loss"
    )

    assert summary["train"]["final_step"] == steps
    first, second = summary["placements"]
    assert victim.node_id in first and victim.node_id not in second
    assert len(set(second)) == 2
    history = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history == list(range(1, steps + 1))
    load_export(run / "export")


def scraped_train_metrics(cluster: LocalCluster) -> set[str]:
    names = set()
    for node in cluster.nodes:
        try:
            text = requests.get(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).text
        except requests.RequestException:
            continue
        names |= {family.name for family in text_string_to_metric_families(text) if "biglearn_train" in family.name}
    return names


def worker_node_of_a_train_worker(cluster: LocalCluster):
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    state = StateApiClient(cluster.dashboard_url, headers=cluster.auth_headers())
    actors = state.list(
        StateResource.ACTORS, ListApiOptions(filters=[("state", "=", "ALIVE")]), raise_on_missing_output=False
    )
    train_nodes = {actor["node_id"] for actor in actors if actor["class_name"] == "RayTrainWorker"}
    return next(node for node in cluster.nodes if node.node_id in train_nodes and node.name != "head")


def plant_half_written_checkpoint(run: Path, committed: int, next_step: int) -> None:
    source, partial = run / f"step-{committed:08d}", run / f"step-{next_step:08d}"
    shutil.copytree(source, partial, dirs_exist_ok=True)
    state = json.loads((partial / "train_state.json").read_text())
    (partial / "train_state.json").write_text(json.dumps({**state, "step": next_step}))
    shard = max(partial.rglob("*model_states.pt"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
