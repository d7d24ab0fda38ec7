"""`biglearn serve` as a user runs it: a local Ray of its own, every port it opens on loopback,
no access-log line per request in its terminal, and a clean stop on SIGTERM."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import yaml

from biglearn.serve.app import DEFAULT_CONFIG
from tests.exports import write_table_export
from tests.integration.conftest import free_port, wait_for

pytestmark = pytest.mark.ray

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening(root: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of `root` and its descendants."""
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            sockets = process.net_connections(kind="tcp")
            name = process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(name, s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN]
    return found


def test_biglearn_serve_listens_on_loopback_only_and_stops_on_sigterm(tmp_path):
    rng = np.random.default_rng(0)
    table = {"age": rng.integers(18, 90, 60).astype(float), "sex": rng.choice(np.array(["F", "M"], dtype=object), 60)}
    export = tmp_path / "export"
    write_table_export(export, table, {"age": "numeric", "sex": "categorical"}, bins=4)
    http_port, metrics_port = free_port(), free_port()
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["http_options"]["port"] = http_port
    (deployments,) = [app["deployments"] for app in config["applications"]]
    for deployment in deployments:
        deployment["ray_actor_options"]["num_cpus"] = 0.25
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).with_name("biglearn")), "serve", "--config", str(tmp_path / "serve.yaml")]
    command += ["--export", str(export), "--metrics-port", str(metrics_port), "--set", "torch_threads=1"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: "[biglearn] serving on" in log.read_text() or server.poll() is not None, 240, "the server")
        assert server.poll() is None, log.read_text()[-3000:]
        base = f"http://127.0.0.1:{http_port}"
        for seed in range(20):
            answer = requests.post(f"{base}/v1/complete", json={"values": {"age": 40}, "seed": seed}, timeout=30)
            assert answer.status_code == 200, answer.text
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for(lambda: "ray_biglearn_requests_total" in requests.get(metrics, timeout=10).text, 60, "the metrics")

        ports = listening(psutil.Process(server.pid))
        print(f"\n[serve] {len(ports)} listening sockets: {sorted(ports)}")
        assert {(http_port, True), (metrics_port, True)} <= {(port, ip in LOOPBACK) for _, ip, port in ports}
        # Ray 2.60 binds one server per Serve replica to "[::]:0", hard-coded (inter-deployment
        # gRPC, ray/serve/_private/replica.py): the only sockets off loopback, one per replica.
        open_ports = [(name, ip, port) for name, ip, port in ports if ip not in LOOPBACK]
        assert all(name.startswith("ray::ServeRepli") and ip == "::" for name, ip, _ in open_ports), open_ports
        assert len(open_ports) == len(deployments), open_ports

        time.sleep(2)  # the terminal has had time to get any per-request lines
        access_lines = [line for line in log.read_text().splitlines() if "POST /v1/complete" in line]
        assert not access_lines, access_lines[:3]

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert "stopping: shutting Serve down" in log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
