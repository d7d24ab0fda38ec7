"""Jobs on a multi-node Ray cluster on this machine (cluster/local.py: a head without CPUs and three
1-CPU worker nodes, token auth on): `ray job submit` with and without the token, Train workers on
several nodes, training metrics on the metrics port, and a worker node lost mid-run with a
half-written checkpoint left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from biglearn.export import load_export
from tests.integration.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from cluster.local import LocalCluster  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = time.monotonic()
    cluster = LocalCluster.up(tmp_path_factory.mktemp("local-cluster"), workers=3, object_store_mb=150, timeout_s=600)
    print(f"\n[test] local cluster up (head + 3 workers) in {time.monotonic() - started:.0f} s")
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

    job = subprocess.run([*submit, *pretrain_args(digits, tmp_path, "submitted")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    summary = json.loads((tmp_path / "submitted" / "summary.json").read_text())
    assert summary["train"]["final_step"] == 12
    [placement] = summary["placements"]
    assert len(set(placement)) == 2 and set(placement) <= workers, "the two ranks should run on two worker nodes"
    model, spec = load_export(tmp_path / "submitted" / "export")
    assert spec.length == 64 and sum(p.numel() for p in model.parameters()) > 0

    # The same submission without the token, by the CLI and over plain HTTP, with a wrong token.
    anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}
    refused = subprocess.run([*submit, "echo", "pwned"], env=anonymous, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Unauthorized" in refused.stdout + refused.stderr
    jobs_api = f"{cluster.dashboard_url}/api/jobs/"
    assert requests.post(jobs_api, json={"entrypoint": "echo pwned"}, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 64}
    assert requests.post(jobs_api, json={"entrypoint": "echo pwned"}, headers=wrong, timeout=30).status_code in (401, 403)
    listed = requests.get(jobs_api, headers=cluster.auth_headers(), timeout=30).json()
    assert [j["entrypoint"] for j in listed if "pwned" in j["entrypoint"]] == [], "a refused job was created"
