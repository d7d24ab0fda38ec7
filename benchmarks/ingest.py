"""Data ingest, measured side by side in one run (run by hand, not in CI).

    python benchmarks/ingest.py [--rows 200000] [--scale 8]

Builds a token dataset (UTF-8 text in 64-byte windows: L = 64, like the digits) with
jobs/prepare_data.py's code, locally and in S3 on loopback (moto's server), then prints:
  1. rows/s and MB/s (on the `scale`x dataset) delivered to a Ray Train worker by Ray Data (streaming, not materialized,
     through pretraining's own `shard_dataset` and `micro_batches`: blocks of data.block_bytes,
     data.fetch_bytes per Ray Data batch) from local shards and from S3 shards, against a plain
     pyarrow read of the same files; and Ray Data handing out batches of 64 itself, for scale;
  2. the training loop's consumption rate for the default model (digits-quick recipe, bare
     PyTorch loop: an upper bound on what the Ray + DeepSpeed loop consumes);
  3. peak memory of conversion (RSS) and of the ingesting worker for 1x and `scale`x the rows,
     split into private pages and the shared object-store pages the worker has mapped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from train_step import bare_loop  # noqa: E402

from biglearn.config import load_config  # noqa: E402
from biglearn.data.manifest import read_manifest, shard_uris  # noqa: E402
from biglearn.data.storage import resolve  # noqa: E402
from biglearn.train.config import DataConfig, PretrainConfig  # noqa: E402
from biglearn.train.ingest import fetch_rows  # noqa: E402
from biglearn.train.run import shard_dataset  # noqa: E402

LENGTH = 64
BATCH = 64  # the default recipe's batch
MB = 2**20

PREPARE = """
import json, resource, sys
from biglearn.data.prepare import PrepareConfig, prepare_dataset
cfg = PrepareConfig.model_validate(json.loads(sys.argv[1]))
manifest = prepare_dataset(cfg)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_corpus(folder: Path, rows: int, seed: int) -> Path:
    """ASCII text of rows * LENGTH bytes, in files of at most 16 MB, written in pieces."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ,.\n", dtype=np.uint8)
    left, index = rows * LENGTH, 0
    while left:
        size = min(left, 16 * MB)
        (folder / f"part-{index:04d}.txt").write_bytes(alphabet[rng.integers(0, len(alphabet), size)].tobytes())
        left, index = left - size, index + 1
    return folder


def prepare(corpus: Path, output: str) -> float:
    """Converts in a fresh process (workers=0, so its peak RSS is the converter's); returns MB."""
    cfg = {
        "source": {"kind": "text", "files": str(corpus), "length": LENGTH},
        "output": output,
        "validation_fraction": 0.0,
        "rows_per_shard": 50_000,
        "workers": 0,
    }
    done = subprocess.run(
        [sys.executable, "-c", PREPARE, json.dumps(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def plain_pyarrow(uri: str, batch_size: int | None) -> tuple[float, float]:
    """(rows/s, MB/s) reading every shard with pyarrow, one after another: whole columns into
    numpy (batch_size None), or cut into torch batches as a hand-written loader would."""
    manifest = read_manifest(uri)
    fs, _ = resolve(uri)
    start, rows, size = time.perf_counter(), 0, 0
    for shard, path in zip(manifest.split("train"), shard_uris(uri, manifest, "train")):
        table = pq.read_table(resolve(path)[1], filesystem=fs, columns=["values"])
        values = table.column("values").combine_chunks().flatten().to_numpy().reshape(-1, LENGTH)
        if batch_size:
            for first in range(0, len(values) - batch_size + 1, batch_size):
                torch.tensor(values[first : first + batch_size], dtype=torch.long)
        rows, size = rows + len(values), size + shard.bytes
    elapsed = time.perf_counter() - start
    return rows / elapsed, size / MB / elapsed


def memory_mb() -> dict[str, float]:
    """This process's resident memory by kind (Linux): private (anonymous) pages, and shared
    memory pages, which include the Ray object store's blocks this process has read from."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {kind: int(fields[key].split()[0]) / 1024 for kind, key in (("private", "RssAnon"), ("shared", "RssShmem"))}


def ingest_worker(config: dict) -> None:
    import ray.train

    from biglearn.train.ingest import micro_batches

    shard = ray.train.get_dataset_shard("train")
    start, first, rows, peak, trace = time.perf_counter(), None, 0, {"private": 0.0, "shared": 0.0}, []
    for index, batch in enumerate(micro_batches(shard, BATCH, config["fetch"], None, None, torch.device("cpu"))):
        if first is None:  # the rate is measured after the first batch: start-up is reported apart
            first, rows = time.perf_counter(), 0
        rows += len(batch.long())
        if index % 256 == 0:
            now = memory_mb()
            peak = {kind: max(peak[kind], mb) for kind, mb in now.items()}
            trace.append((rows, round(now["private"]), round(now["shared"])))
    elapsed = time.perf_counter() - first
    Path(config["out"]).write_text(
        json.dumps(
            {
                "rows": rows,
                "seconds": elapsed,
                "first_batch_s": first - start,
                "trace": trace,
                **{f"peak_{kind}_mb": mb for kind, mb in peak.items()},
            }
        )
    )


def ray_data(uri: str, scratch: Path, fetch: int) -> dict:
    """Ray Data -> one Ray Train worker, streaming (as pretraining reads datasets too big to keep)."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    manifest = read_manifest(uri)
    out = scratch / f"ingest-{time.monotonic_ns()}.json"
    dataset = shard_dataset(uri, manifest, "train", DataConfig().block_bytes)
    TorchTrainer(
        ingest_worker,
        train_loop_config={"out": str(out), "fetch": fetch},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=str(scratch / "ray"), name=out.stem),
        datasets={"train": dataset},
    ).fit()
    result = json.loads(out.read_text())
    size = sum(s.bytes for s in manifest.split("train"))
    result["rows_per_s"] = result["rows"] / result["seconds"]
    result["mb_per_s"] = size * result["rows"] / manifest.rows("train") / MB / result["seconds"]
    return result


def start_s3() -> str:
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the 1x dataset")
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument(
        "--fetch-rows",
        type=int,
        help="rows per Ray Data batch, cut into batches of 64 (default: what pretraining takes for data.fetch_bytes)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    start_s3()  # before Ray starts, so its workers inherit the endpoint

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        small = write_corpus(scratch / "corpus-1x", args.rows, seed=0)
        large = write_corpus(scratch / "corpus-big", args.rows * args.scale, seed=1)
        big = f"{args.scale}x"
        prep = {
            "local 1x": prepare(small, str(scratch / "local-1x")),
            f"local {big}": prepare(large, str(scratch / "local-big")),
            f"s3 {big}": prepare(large, "s3://bench/text-big"),
        }
        mb = sum(s.bytes for s in read_manifest(str(scratch / "local-big")).split("train")) / MB

        local, s3 = str(scratch / "local-big"), "s3://bench/text-big"
        fetch = args.fetch_rows or fetch_rows(read_manifest(local), DataConfig().fetch_bytes)
        raw_local, raw_s3 = plain_pyarrow(local, None), plain_pyarrow(s3, None)
        pyarrow_local, pyarrow_s3 = plain_pyarrow(local, BATCH), plain_pyarrow(s3, BATCH)
        ray_local = ray_data(local, scratch, fetch)
        ray_local_unfetched = ray_data(local, scratch, BATCH)
        ray_s3 = ray_data(s3, scratch, fetch)
        ray_small = ray_data(str(scratch / "local-1x"), scratch, fetch)

    cfg = load_config(PretrainConfig, REPO / "biglearn/recipes/digits-quick.yaml")
    values = torch.randint(0, 17, (4096, LENGTH))
    consumed = bare_loop(cfg, values, (8, 8), args.train_steps)
    ray.shutdown()

    print(
        f"\n1x dataset: {args.rows} rows of L={LENGTH} tokens; {big}: {args.rows * args.scale} rows, "
        f"{mb:.1f} MB of Parquet, read once per rate (after the first batch)"
    )
    ray_label = f"Ray Data -> Train worker, fetch {fetch}, "
    print(
        f"\n{f'ingest ({big}, batches of {BATCH})':<52}{'rows/s':>12}{'MB/s':>9}{'vs pyarrow':>12}{'vs training':>13}"
    )
    rows = (
        (
            "local shards",
            raw_local,
            pyarrow_local,
            {ray_label: ray_local, f"Ray Data, batches of {BATCH} from Ray Data, ": ray_local_unfetched},
        ),
        ("S3 on loopback", raw_s3, pyarrow_s3, {ray_label: ray_s3}),
    )
    for where, raw, (rows_s, mb_s), ray_results in rows:
        print(f"  {'pyarrow whole-file read, ' + where:<50}{raw[0]:>12,.0f}{raw[1]:>9.1f}")
        print(
            f"  {'pyarrow -> torch batches, ' + where:<50}{rows_s:>12,.0f}{mb_s:>9.1f}{'1.00x':>12}{rows_s / consumed:>12.1f}x"
        )
        for label, result in ray_results.items():
            print(
                f"  {label + where:<50}{result['rows_per_s']:>12,.0f}{result['mb_per_s']:>9.1f}"
                f"{result['rows_per_s'] / rows_s:>11.2f}x{result['rows_per_s'] / consumed:>12.1f}x"
                f"   (first batch after {result['first_batch_s']:.1f} s)"
            )
    print(f"  {'training consumes (default model)':<50}{consumed:>12,.0f}")
    print(f"\n{'peak memory (MB)':<46}{'1x':>10}{f'{args.scale}x':>10}")
    print(f"  {'prepare_data (converter process, RSS)':<44}{prep['local 1x']:>10.0f}{prep[f'local {big}']:>10.0f}")
    for kind in ("private", "shared"):
        print(
            f"  {f'ingesting Ray Train worker, {kind}':<44}{ray_small[f'peak_{kind}_mb']:>10.0f}{ray_local[f'peak_{kind}_mb']:>10.0f}"
        )
    print(
        f"  (prepare_data into S3, {big}: {prep[f's3 {big}']:.0f} MB; a worker's shared pages are object-store "
        "memory it has mapped, bounded by the store's size)"
    )


if __name__ == "__main__":
    main()
