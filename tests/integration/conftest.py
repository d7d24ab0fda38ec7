"""Shared pieces of the integration tests: a local Ray cluster, the embedded digits, a tiny
pretraining config, and an S3-compatible server (moto) on loopback that checks signatures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from biglearn.config import load_config
from biglearn.data.digits import ensure_digits
from biglearn.train.config import PretrainConfig


def metrics_history(run_folder: str) -> list[dict]:
    """The records of a run's metrics.jsonl, in file order."""
    return [json.loads(line) for line in (Path(run_folder) / "metrics.jsonl").read_text().splitlines()]


def tiny_config(data: str, storage: str | Path, name: str, *extra: str) -> PretrainConfig:
    """A two-worker ZeRO-2 run small enough for a 2-core machine."""
    return load_config(PretrainConfig, None, tiny_overrides(data, storage, name, *extra))


def tiny_overrides(data: str, storage: str | Path, name: str, *extra: str) -> list[str]:
    """tiny_config's `--set` items, e.g. for `ray job submit -- python jobs/pretrain.py`."""
    return [
        f"data.path={data}",
        f"run.storage={storage}",
        f"run.name={name}",
        "model.d_model=32",
        "model.num_layers=1",
        "model.num_heads=2",
        "optim.batch_size=32",
        "optim.warmup_steps=2",
        "train.steps=12",
        "train.log_every=1",
        "train.checkpoint_every=4",
        "cluster.num_workers=2",
        "cluster.torch_threads=1",
        "eval.panel_examples=16",
        "eval.panel_steps=2",
        "eval.decode_steps=2",
        "eval.num_joint=4",
        "eval.draws=2",
        "eval.num_shown=4",
        *extra,
    ]


def start_local_ray(metrics_port: bool = False) -> None:
    """Starts a two-CPU local Ray, trying twice: on a loaded machine the raylet may miss Ray's
    fixed 30 s to register, which would fail a whole module. After such a failure it prints
    raylet.err and kills the processes that start left behind (those started before, such as
    the S3 server, are kept)."""
    import psutil
    import ray

    for attempt in (1, 2):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                **({"_metrics_export_port": free_port()} if metrics_port else {}),
            )
            return
        except Exception as error:
            if attempt == 2 or "timed out during startup" not in str(error):
                raise
            raylet_err = Path("/tmp/ray/session_latest/logs/raylet.err")
            tail = raylet_err.read_text(errors="replace")[-2000:] if raylet_err.exists() else "(none)"
            print(f"Ray did not start ({error}); its raylet.err ends with:\n{tail}\nTrying once more.")
            for child in psutil.Process().children(recursive=True):
                if child.pid not in before:
                    child.kill()
            ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module (training tests start TorchTrainers on it)."""
    import ray

    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("data") / "digits")
    ensure_digits(path)
    return path


def wait_for(condition, timeout_s: float, what: str, every_s: float = 0.5):
    """Polls `condition` until it returns something truthy (returned), failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """moto's server mode with IAM checks on: wrong or missing credentials are refused, as on AWS."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str):
        self.endpoint, self.access_key, self.secret_key = endpoint, access_key, secret_key

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Starts the server, creates a user with an S3 policy, and points this process's AWS chain
    (inherited by Ray workers started afterwards) at it."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # The first 3 requests (creating the user, its policy and key) are let through unsigned.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    log = open(tmp_path_factory.mktemp("s3") / "moto.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("moto server did not start; see moto.log") from None
            time.sleep(0.2)
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="biglearn")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="biglearn", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="biglearn")["AccessKey"]

    saved = {
        name: os.environ.get(name)
        for name in (
            "AWS_ENDPOINT_URL_S3",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_EC2_METADATA_DISABLED",
            "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE",
        )
    }
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID=key["AccessKeyId"],
        AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"],
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata lookups on a test machine
        AWS_CONFIG_FILE=os.devnull,  # nothing from the developer's own ~/.aws
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.terminate()
    server.wait(10)
    log.close()
