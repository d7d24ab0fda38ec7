"""A multi-node Ray cluster on this machine, with token auth, for development and tests.

    python cluster/local.py up [--workers 2] [--cpus-per-worker 1]   # head (no CPUs) + workers
    python cluster/local.py status
    python cluster/local.py down

`up` starts a head and N worker nodes, each a `ray start --block` process with its own explicit
free ports, all on 127.0.0.1, token auth on (a fresh token in <state-dir>/auth_token, mode 600),
and writes <state-dir>/cluster.json (addresses, node ids, process ids). `down` stops exactly
those processes (never a global `ray stop`: other clusters on the machine are left alone) and
any process still using this cluster's Ray temp folder. Submit jobs with the lines `up` prints:

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<state-dir>/auth_token
    ray job submit --address http://127.0.0.1:<port> --working-dir . -- python jobs/pretrain.py \
        --set cluster.num_workers=2 --set run.storage=$PWD/runs

The nodes share this machine's file system, so a local absolute run.storage is storage every node
sees; on a real cluster it must be a shared mount or s3://.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

DEFAULT_STATE_DIR = Path(".local-cluster")
HOST = "127.0.0.1"
# Every process of a node inherits these from its `ray start`: they find exactly this cluster's
# (and this node's) processes, including workers whose parents are gone.
CLUSTER_MARK, NODE_MARK = "BIGLEARN_LOCAL_CLUSTER", "BIGLEARN_LOCAL_NODE"


class LocalClusterError(RuntimeError):
    """The local cluster could not be started or found; the message says what to do."""


@dataclass
class Node:
    name: str
    pid: int
    node_id: str
    metrics_port: int
    log: str


@dataclass
class LocalCluster:
    state_dir: str
    temp_dir: str
    gcs_address: str
    dashboard_url: str
    token_path: str
    nodes: list[Node] = field(default_factory=list)

    # --- starting ------------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        workers: int = 2,
        cpus_per_worker: float = 1,
        object_store_mb: int = 200,
        timeout_s: float = 120,
    ) -> LocalCluster:
        state = Path(state_dir).resolve()
        if (state / "cluster.json").exists():
            raise LocalClusterError(f"{state}/cluster.json exists: a cluster is up there; run `down` first")
        state.mkdir(parents=True, exist_ok=True)
        token = state / "auth_token"
        # Created 600 from the start, never readable by others even for a moment.
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        # Ray's session files (sockets, logs) go to a folder of this cluster only; Unix socket paths
        # are limited to ~107 bytes, so it is short and under /tmp rather than inside state_dir.
        temp_dir = f"/tmp/biglearn-ray-{hashlib.sha1(str(state).encode()).hexdigest()[:10]}"
        gcs_port, dashboard_port = _free_port(), _free_port()
        cluster = cls(str(state), temp_dir, f"{HOST}:{gcs_port}", f"http://{HOST}:{dashboard_port}", str(token))
        head_args = [
            "--head",
            f"--port={gcs_port}",
            f"--temp-dir={temp_dir}",
            "--num-cpus=0",
            "--include-dashboard=true",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={_free_port()}",
        ]
        # The dashboard's own metrics server has a fixed default port (44227) that another cluster
        # on this machine may hold; on a busy machine the dashboard can need more than 60 s to start.
        head_env = {"DASHBOARD_METRIC_PORT": str(_free_port()), "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(int(timeout_s))}
        try:
            cluster._start_node("head", head_args, object_store_mb, timeout_s, head_env)
            for index in range(1, workers + 1):
                # One log monitor per machine: more would print every worker's output several times.
                worker_args = [
                    f"--address={cluster.gcs_address}",
                    f"--num-cpus={cpus_per_worker}",
                    "--include-log-monitor=false",
                ]
                cluster._start_node(f"worker-{index}", worker_args, object_store_mb, timeout_s)
        except BaseException:
            cluster.down()
            raise
        return cluster

    def env(self) -> dict[str, str]:
        """What a client (ray job submit, the Jobs SDK, ray.init) needs in its environment."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def _start_node(
        self,
        name: str,
        role_args: list[str],
        object_store_mb: int,
        timeout_s: float,
        extra_env: dict[str, str] | None = None,
        attempts: int = 3,
    ) -> None:
        """Starts one node and waits until it is alive in the cluster. Ray gives a raylet a fixed
        30 s to register, which a busy machine can miss; such a start is tried again."""
        log = Path(self.state_dir) / f"{name}.log"
        known = set(self._alive_node_ids()) if self.nodes else set()
        # `python` in a job's entrypoint is this environment's, as on a cluster whose image has the project.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {
            **os.environ,
            "PATH": path,
            **self.env(),
            **(extra_env or {}),
            CLUSTER_MARK: self.state_dir,
            NODE_MARK: name,
        }
        deadline = time.monotonic() + timeout_s
        for attempt in range(1, attempts + 1):
            metrics_port = _free_port()
            command = [
                str(Path(sys.executable).with_name("ray")),
                "start",
                "--block",
                *role_args,
                f"--object-store-memory={object_store_mb * 2**20}",
                f"--node-manager-port={_free_port()}",
                f"--object-manager-port={_free_port()}",
                f"--metrics-export-port={metrics_port}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}",
                "--disable-usage-stats",
            ]
            with open(log, "a") as out:
                # Its own session: Ctrl-C in the shell that ran `up` does not reach the nodes.
                process = subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            node = Node(name, process.pid, "", metrics_port, str(log))
            self.nodes = [n for n in self.nodes if n.name != name] + [node]
            self._save()
            last_error = None
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    new = set(self._alive_node_ids()) - known
                except Exception as exc:  # noqa: BLE001 - the dashboard is not answering yet
                    new, last_error = set(), exc
                if new:
                    node.node_id = new.pop()
                    self._save()
                    return
                time.sleep(0.5)
            if process.poll() is None:
                raise LocalClusterError(f"node {name} did not join within {timeout_s:.0f} s ({last_error}); see {log}")
            print(
                f"[local-cluster] node {name} failed to start (attempt {attempt}/{attempts}); see {log}",
                file=sys.stderr,
            )
            self._kill_stragglers(lambda e: e.get(CLUSTER_MARK) == self.state_dir and e.get(NODE_MARK) == name)
        raise LocalClusterError(f"node {name} failed to start {attempts} times; see {log}")

    def auth_headers(self) -> dict[str, str]:
        """For HTTP clients in a process whose Ray was imported without this cluster's token
        settings (Ray reads RAY_AUTH_MODE once, at import)."""
        return {"Authorization": f"Bearer {Path(self.token_path).read_text().strip()}"}

    def _alive_node_ids(self) -> list[str]:
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(self.dashboard_url, headers=self.auth_headers())
        options = ListApiOptions(filters=[("state", "=", "ALIVE")], timeout=10)
        return [node["node_id"] for node in client.list(StateResource.NODES, options, raise_on_missing_output=False)]

    def _save(self) -> None:
        path = Path(self.state_dir) / "cluster.json"
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(asdict(self), indent=2))
        staging.replace(path)

    # --- using and stopping --------------------------------------------------------------------

    @classmethod
    def load(cls, state_dir: str | Path = DEFAULT_STATE_DIR) -> LocalCluster:
        path = Path(state_dir).resolve() / "cluster.json"
        if not path.exists():
            raise LocalClusterError(f"no local cluster recorded at {path}; start one with `up`")
        raw = json.loads(path.read_text())
        return cls(**{**raw, "nodes": [Node(**node) for node in raw["nodes"]]})

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def kill_node(self, name: str) -> None:
        """Loses a node as a machine would: SIGKILL, no draining. Ray's processes started by the
        node's `ray start --block` die with it (the kernel's parent-death signal)."""
        node = self.node(name)
        os.kill(node.pid, signal.SIGKILL)
        _wait_gone([node.pid], 10)
        self._kill_stragglers(lambda env: env.get(CLUSTER_MARK) == self.state_dir and env.get(NODE_MARK) == name)

    def down(self, timeout_s: float = 30) -> None:
        """Stops this cluster's nodes (workers first, the head last) and nothing else."""
        for node in reversed(self.nodes):
            try:
                os.kill(node.pid, signal.SIGTERM)  # ray start --block: drains, then stops its processes
            except ProcessLookupError:
                continue
            if not _wait_gone([node.pid], timeout_s):
                os.kill(node.pid, signal.SIGKILL)
        self._kill_stragglers(lambda env: env.get(CLUSTER_MARK) == self.state_dir)
        state = Path(self.state_dir)
        (state / "cluster.json").unlink(missing_ok=True)
        (state / "auth_token").unlink(missing_ok=True)

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes still running."""
        return [p for p in _processes() if _environ(p).get(CLUSTER_MARK) == self.state_dir]

    def _kill_stragglers(self, belongs) -> None:
        left = [p for p in _processes() if belongs(_environ(p))]
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        _wait_gone([p.pid for p in left], 10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _processes():
    return [p for p in psutil.process_iter() if p.pid != os.getpid()]


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="default: %(default)s")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (default: %(default)s)")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="default: %(default)s")
    parser.add_argument("--object-store-mb", type=int, default=200, help="per node (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            if args.workers < 1:
                raise LocalClusterError("--workers must be at least 1")
            cluster = LocalCluster.up(args.state_dir, args.workers, args.cpus_per_worker, args.object_store_mb)
        else:
            cluster = LocalCluster.load(args.state_dir)
    except LocalClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "down":
        cluster.down()
        print(f"[local-cluster] stopped {len(cluster.nodes)} node(s); logs stay under {cluster.temp_dir}")
        return 0
    alive = [node.name for node in cluster.nodes if _running(node.pid)]
    print(f"[local-cluster] {len(alive)}/{len(cluster.nodes)} node(s) running: {', '.join(alive)}; token auth on")
    env = " ".join(f"{key}={value}" for key, value in cluster.env().items())
    print(f"  export {env}\n  export RAY_ADDRESS={cluster.dashboard_url}   # Jobs API and dashboard")
    print(
        "  ray job submit --working-dir . -- python jobs/pretrain.py "
        f"--set cluster.num_workers={len(cluster.nodes) - 1} --set run.storage=$PWD/runs"
    )
    print("  metrics: " + ", ".join(f"{n.name} http://{HOST}:{n.metrics_port}/metrics" for n in cluster.nodes))
    print(
        f"  logs: {cluster.temp_dir}/session_latest/logs; stop: python cluster/local.py down --state-dir {args.state_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
