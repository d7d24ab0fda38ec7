"""A local autoscaling Ray cluster for tests: Ray's fake multi-node provider on one machine.

`ray.cluster_utils.AutoscalingCluster` does the same but runs `ray stop --force` on start and
stop (killing every Ray cluster on the machine, other users' too) and needs a config file the
2.60 wheel does not ship; this one owns a temp dir and stops only the processes that use it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.integration.conftest import free_port


class FakeAutoscalingCluster:
    def __init__(self, worker_cpus: float, max_workers: int, idle_timeout_s: float = 6.0, object_store_mb: int = 150):
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="rayfake", dir="/tmp")  # short: Ray's socket paths have a length limit
        # Token auth as our cluster definitions have it, with this cluster's own token (never ~/.ray).
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        worker = {
            "resources": {"CPU": worker_cpus, "object_store_memory": object_store_mb * 2**20},
            "node_config": {},
            "min_workers": 0,
            "max_workers": max_workers,
        }
        self.config = {
            "cluster_name": "fake-" + Path(self.temp_dir).name,
            "max_workers": max_workers,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "gcs_address": self.address,
            },
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                "cpu_worker": worker,
            },
            "head_node_type": "ray.head.default",
            "auth": {},
            "docker": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_s / 60,
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
        }

    def start(self) -> FakeAutoscalingCluster:
        config = Path(self.temp_dir) / "autoscaling.json"
        config.write_text(json.dumps(self.config))
        ray = Path(sys.executable).parent / "ray"
        # RAY_ADDRESS reaches every worker: Ray Train's placement-group cleaner looks its cluster
        # up through the state API, which refuses to guess when other clusters run on the machine.
        env = {
            **os.environ,
            **self.env,
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            "RAY_ADDRESS": self.address,
        }
        subprocess.run(
            [
                str(ray),
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.port}",
                "--num-cpus=0",
                f"--autoscaling-config={config}",
                f"--temp-dir={self.temp_dir}",
                "--object-store-memory=200000000",
                # The dashboard serves the state API Ray Train's placement-group cleaner relies on.
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                "--disable-usage-stats",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        return self

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming its temp dir or its GCS port (the Ray client
        server names only the port), and their descendants."""
        roots = []
        mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        for proc in psutil.process_iter(["cmdline"]):
            if proc.pid not in mine and any(
                self.temp_dir in part or part.endswith(f":{self.port}") for part in proc.info["cmdline"] or []
            ):
                roots.append(proc)
        found = {p.pid: p for p in roots}
        for root in roots:
            try:
                found.update({child.pid: child for child in root.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def stop(self) -> None:
        for _ in range(3):
            procs = self.processes()
            if not procs:
                return
            for proc in procs:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=10)
            time.sleep(1)
