"""The whole data path through an S3-compatible server on loopback (moto, signatures checked):
prepare a dataset into s3://, train on it through Ray Data with checkpoints in s3://, survive a
killed worker, resume; and the errors for a missing bucket or prefix, wrong or missing
credentials, credentials in a URI, a corrupted shard and an interrupted conversion. Only the
endpoint differs from a user's real S3; credentials never show up in messages or saved files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import biglearn
import biglearn.data.prepare as prepare_module
from biglearn import cli
from biglearn.data.manifest import read_manifest, read_split
from biglearn.data.storage import fetch_folder, list_files, read_bytes, read_tagged, write_if
from biglearn.serving import CompleteRequest, ExportedModel, ServingConfig, complete_tasks, parse_request
from biglearn.train.run import pretrain
from tests.integration.conftest import start_local_ray, tiny_config

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_with_s3(s3_server):
    """Ray started after the AWS settings are in place, so its workers share them."""
    import ray

    start_local_ray()
    yield s3_server
    ray.shutdown()


def run_prepare(*settings: str) -> int:
    return cli.prepare([arg for item in settings for arg in ("--set", item)])


def test_prepare_train_and_resume_all_in_s3(ray_with_s3, capsys):
    s3 = ray_with_s3
    s3.create_bucket("datasets")
    s3.create_bucket("runs")
    data = "s3://datasets/digits"
    assert run_prepare("source.kind=digits", f"output={data}", "validation_fraction=0.2", "rows_per_shard=300") == 0
    manifest = read_manifest(data)
    assert manifest.rows("train") == 1437 and len(manifest.split("train")) == 5
    assert "manifest.json" in list_files(data) and not any(k.startswith("_receipts") for k in list_files(data))

    storage = "s3://runs/pretrain"
    cfg = tiny_config(
        data,
        storage,
        "s3run",
        "train.steps=8",
        "cluster.max_failures=1",
        "train.faults=[{kind: kill, step: 6, rank: 0}]",
    )
    outcome = pretrain(cfg)
    # Rank 0 was SIGKILLed at step 6; the restarted group read its checkpoint back from S3.
    assert outcome.summary["train"] == {"final_step": 8, "resumes": [4]}
    run_files = list_files(f"{storage}/s3run")
    assert {"export/model.safetensors", "export/model.json", "metrics.jsonl", "summary.json", "config.json"} <= set(
        run_files
    )
    history = [json.loads(line)["step"] for line in read_bytes(f"{storage}/s3run/metrics.jsonl").decode().splitlines()]
    assert history == list(range(1, 9))

    # The same command again: the finished run is found in S3 and nothing is retrained.
    assert pretrain(cfg).summary["train"] == {"final_step": 8, "resumes": [4]}

    # A Serve replica loads the export straight from S3 (copied to a local folder first).
    served = ExportedModel(fetch_folder(f"{storage}/s3run/export"))
    assert served.problem is None and served.card.dataset == "digits" and served.card.panel is not None
    task = parse_request(CompleteRequest(values={0: 3}, seed=1), served, ServingConfig())
    (sample,) = complete_tasks(served.model, [task], served.device)
    assert sample[0, 0] == 3 and ((0 <= sample) & (sample < 17)).all()
    # and so does the Python API, with the same answer
    model = biglearn.load(f"{storage}/s3run/export", device="cpu")
    assert np.array_equal(model.complete({0: 3}, seed=1).samples, sample.numpy())

    out = capsys.readouterr()
    saved = b"".join(
        read_bytes(f"{storage}/s3run/{name}") for name in ("config.json", "summary.json", "export/config.json")
    )
    for secret in (s3.secret_key, s3.access_key):
        assert secret not in out.out + out.err and secret.encode() not in saved


def test_an_interrupted_conversion_to_s3_completes_without_duplicates(ray_with_s3, monkeypatch):
    s3 = ray_with_s3
    s3.create_bucket("interrupted")
    output = "s3://interrupted/gmm"
    settings = ("source.kind=gmm", "source.num_examples=5000", f"output={output}", "rows_per_shard=1000", "workers=0")
    real_write_shard, calls = prepare_module.write_shard, []

    def dies_on_fourth(*args):
        calls.append(args[3:5])
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-conversion
        return real_write_shard(*args)

    monkeypatch.setattr(prepare_module, "write_shard", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(*settings)
    assert "manifest.json" not in list_files(output)
    calls.clear()
    assert run_prepare(*settings) == 0
    assert len(calls) == 3  # 6 shards planned, 3 already there
    manifest = read_manifest(output)
    rows = np.concatenate([read_split(output, manifest, s)["values"] for s in ("train", "validation")]).reshape(-1, 2)
    assert len(rows) == 5000 and len(np.unique(rows, axis=0)) == 5000


def test_storage_errors_say_what_is_wrong(ray_with_s3, monkeypatch, tmp_path, capsys):
    s3 = ray_with_s3
    s3.create_bucket("errors")

    assert run_prepare("source.kind=digits", "output=s3://no-such-bucket/digits") == 2
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err

    args = ["--set", f"run.storage={tmp_path}"]
    assert cli.pretrain([*args, "--set", "data.path=s3://errors/nothing-here"]) == 2
    assert "no dataset at s3://errors/nothing-here" in capsys.readouterr().err

    assert run_prepare("source.kind=digits", "output=s3://AKIAFAKE:hunter22@errors/digits") == 2
    err = capsys.readouterr().err
    assert "credentials" in err and "hunter22" not in err

    assert run_prepare("source.kind=digits", "output=s3://errors/digits", "rows_per_shard=500") == 0
    shard = "errors/digits/train-00001.parquet"
    body = s3.client().get_object(Bucket="errors", Key="digits/train-00001.parquet")["Body"].read()
    s3.client().put_object(Bucket="errors", Key="digits/train-00001.parquet", Body=body[: len(body) // 2])
    assert cli.pretrain([*args, "--set", "data.path=s3://errors/digits"]) == 2
    err = capsys.readouterr().err
    assert f"s3://{shard}" in err and "truncated" in err

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-not-the-secret")
    assert run_prepare("source.kind=digits", "output=s3://errors/digits2") == 2
    err = capsys.readouterr().err
    assert "access to bucket 'errors' was denied" in err and "definitely-not-the-secret" not in err
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert run_prepare("source.kind=digits", "output=s3://errors/digits3") == 2
    err = capsys.readouterr().err
    assert "no AWS credentials found" in err and "Traceback" not in err
    assert not any(k.startswith(("digits2", "digits3")) for k in list_files_as(s3, "errors"))


def list_files_as(s3, bucket: str) -> list[str]:
    """Keys in `bucket`, listed with the server's good credentials whatever the environment holds."""
    return [item["Key"] for item in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_a_run_in_object_storage_is_leased_to_one_process_and_a_lapsed_lease_is_taken_over(s3_server):
    from biglearn.train.ownership import RunBusyError, RunLease

    run = f"s3://{s3_server.create_bucket('leases')}/runs/G"
    lease_key = "runs/G/_lease.json"
    with RunLease(run, ttl_s=2) as first:
        holder = json.loads(read_bytes(f"{run}/_lease.json"))
        assert holder["pid"] == os.getpid() and holder["token"] == first.holder["token"]
        time.sleep(2.5)  # past the TTL, renewed every ttl/4: still fresh
        assert json.loads(read_bytes(f"{run}/_lease.json"))["renewed"] > holder["renewed"]
        with pytest.raises(RunBusyError, match=rf"run folder {run} is in use .*pid {os.getpid()}"):
            with RunLease(run, ttl_s=2):
                pass
    assert lease_key not in {o["Key"] for o in s3_server.client().list_objects_v2(Bucket="leases").get("Contents", [])}

    # A holder on another machine that stopped renewing: its lease lapses after the TTL.
    lapsed = {
        "host": "elsewhere",
        "pid": 1,
        "started": "2026-01-01T00:00:00+00:00",
        "token": "t",
        "renewed": time.time(),
    }
    s3_server.client().put_object(Bucket="leases", Key=lease_key, Body=json.dumps(lapsed).encode())
    with pytest.raises(RunBusyError, match="host elsewhere, pid 1"):
        with RunLease(run, ttl_s=30):
            pass
    s3_server.client().put_object(Bucket="leases", Key=lease_key, Body=json.dumps({**lapsed, "renewed": 0}).encode())
    with RunLease(run, ttl_s=30) as successor:
        assert json.loads(read_bytes(f"{run}/_lease.json"))["token"] == successor.holder["token"]

    # Two runs that both read the lease as lapsed (or absent) both write it conditionally on
    # what they read: only the first write goes through.
    lease = f"{run}/_lease.json"
    s3_server.client().delete_object(Bucket="leases", Key=lease_key)
    first = write_if(lease, b"first", None)
    assert first and write_if(lease, b"second", None) is None
    read = read_tagged(lease)
    assert read == (b"first", first)
    assert write_if(lease, b"third", first) and write_if(lease, b"fourth", first) is None, "a stale tag loses"
    s3_server.client().delete_object(Bucket="leases", Key=lease_key)
    assert write_if(lease, b"fifth", first) is None and read_tagged(lease) is None, "a deleted lease is not recreated"

    # A holder whose lease another process overwrote stops renewing it and fails on release,
    # leaving the other lease in place.
    with pytest.raises(RunBusyError, match="was taken over while this run held it .*host elsewhere"):
        with RunLease(run, ttl_s=0.4) as holder:
            deadline = time.monotonic() + 20
            while holder.lost_to is None and time.monotonic() < deadline:  # the next renewal finds it
                s3_server.client().put_object(Bucket="leases", Key=lease_key, Body=json.dumps(lapsed).encode())
                time.sleep(0.3)
            assert holder.lost_to["host"] == "elsewhere"
    assert json.loads(read_bytes(f"{run}/_lease.json"))["host"] == "elsewhere", "the other holder's lease is kept"
