"""Converting a source into a dataset: a seeded split, shards written in parallel, manifest last.

The plan (which rows go to which shard) is a pure function of the source's length, the seed,
the validation fraction and the shard size, and its fingerprint covers the source's identity
too. Each finished shard leaves a small receipt beside it (`_receipts/<shard>.json`: its rows,
bytes and sha256 under that fingerprint), so a re-run after an interruption skips every shard
it already holds and converts only the rest: no row is written twice. The manifest, written
last, is the commit; receipts are then removed.

Memory: a worker holds one shard's rows at a time, so it does not grow with the dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field, NonNegativeInt, PositiveInt

from biglearn.config import Config
from biglearn.data.manifest import MANIFEST, DatasetError, Manifest, Shard, encode_table, read_manifest
from biglearn.data.sources import Source, SourceInput, open_source
from biglearn.data.storage import (
    StorageError,
    check_bucket,
    delete_dir,
    delete_file,
    join,
    list_files,
    read_bytes,
    write_bytes,
)

log = logging.getLogger("biglearn")
RECEIPTS = "_receipts"
REPLACED = f"{RECEIPTS}/replaced-manifest.json"  # a dataset's manifest while it is being replaced
STAGING = re.compile(r".+\.[0-9a-f]{32}\.partial")  # storage.write_bytes' staging files


class PrepareConfig(Config):
    source: SourceInput
    """The input to convert, chosen by its `kind`: idx, images, text, digits, gmm or table."""
    output: str
    """Local folder or s3://bucket/prefix to write the dataset to."""
    name: str | None = None
    """Dataset name in the manifest (default: from the input)."""
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    """Share of the rows held out as the validation split (rounded up)."""
    seed: int = 0
    """Seeds the train/validation split and the row order within each split."""
    rows_per_shard: PositiveInt = 10_000
    """Rows per Parquet shard; a split's last shard may hold fewer."""
    workers: NonNegativeInt = 2
    """Conversion processes; 0 converts in this process."""
    overwrite: bool = False
    """Replace a dataset already committed at `output` by a different one."""


def prepare_dataset(cfg: PrepareConfig) -> Manifest:
    """Checks the input and output, then converts; returns the committed manifest."""
    check_bucket(cfg.output)
    with open_source(cfg.source) as source:
        return write_source(
            source,
            cfg.output,
            name=cfg.name or source.name,
            validation_fraction=cfg.validation_fraction,
            seed=cfg.seed,
            rows_per_shard=cfg.rows_per_shard,
            workers=cfg.workers,
            overwrite=cfg.overwrite,
        )


def split_plan(count: int, validation_fraction: float, seed: int, rows_per_shard: int) -> dict[str, list[np.ndarray]]:
    """{split: [row indices of each shard]}: a seeded permutation, its first ceil(f*N) rows validation."""
    order = np.random.default_rng(seed).permutation(count)
    num_validation = math.ceil(count * validation_fraction)
    splits = {"train": order[num_validation:], "validation": order[:num_validation]}
    return {
        split: [rows[start : start + rows_per_shard] for start in range(0, len(rows), rows_per_shard)]
        for split, rows in splits.items()
        if len(rows)
    }


def write_source(
    source: Source,
    output: str,
    *,
    name: str,
    validation_fraction: float,
    seed: int,
    rows_per_shard: int,
    workers: int = 0,
    overwrite: bool = False,
) -> Manifest:
    plan = split_plan(len(source), validation_fraction, seed, rows_per_shard)
    if "train" not in plan:
        raise DatasetError(f"{name}: {len(source)} rows leave nothing for training; lower validation_fraction")
    source.fit(np.concatenate(plan["train"]))
    fingerprint = _fingerprint(source, validation_fraction, seed, rows_per_shard)
    try:
        existing = list_files(output)
    except StorageError as exc:
        raise DatasetError(str(exc)) from None
    existing = _without_staging_leftovers(output, existing)
    if MANIFEST in existing:
        current = read_manifest(output)
        if current.plan == fingerprint:
            log.info(f"[biglearn] {output} already holds this dataset ({current.name}); nothing to do")
            return current
        if not overwrite:
            raise DatasetError(
                f"{output} already holds a different dataset ({current.name!r}); choose another output, "
                "or set overwrite=true to replace it"
            )
    ours = _ours(output, existing)
    foreign = sorted(set(existing) - ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DatasetError(
            f"{output} holds files that no biglearn conversion wrote ({shown}); a dataset is written only into an "
            "empty folder or one holding its own files: choose another output, or move those files away"
        )
    if MANIFEST in existing:
        # Withdraw the commit before touching shards: a replacement that dies half-way leaves an
        # incomplete dataset (refused), never an old manifest over new shards. The old manifest
        # stays among the receipts, so that its shards are still known as ours.
        write_bytes(join(output, REPLACED), read_bytes(join(output, MANIFEST)))
        delete_file(join(output, MANIFEST))

    shards: dict[tuple[str, int], Shard] = {}
    todo = []
    for split, parts in plan.items():
        for index, rows in enumerate(parts):
            done = _receipt(output, existing, _shard_name(split, index), fingerprint, len(rows))
            if done:
                shards[split, index] = done
            else:
                todo.append((split, index, rows))
    total_rows = sum(len(rows) for _, _, rows in todo)
    if shards:
        log.info(f"[biglearn] resuming: {len(shards)} shard(s) already written, {len(todo)} to go")
    log.info(
        f"[biglearn] converting {total_rows} rows into {len(todo)} shard(s) at {output} ({workers or 'no'} worker processes)"
    )

    started, written = time.monotonic(), 0
    for (split, index), shard in _convert(source, output, fingerprint, todo, workers):
        shards[split, index] = shard
        written += shard.rows
        rate = written / max(time.monotonic() - started, 1e-9)
        log.info(f"[biglearn] shard {shard.path}: {shard.rows} rows | {written}/{total_rows} rows | {rate:.0f} rows/s")

    manifest = Manifest(
        name=name,
        kind=source.kind,
        length=source.length,
        vocab_size=source.vocab_size,
        patch_dim=source.patch_dim,
        geometry=source.geometry,
        columns=list(source.rows(plan["train"][0][:1])),
        splits={split: [shards[split, i] for i in range(len(parts))] for split, parts in plan.items()},
        plan=fingerprint,
        table=source.table,
    )
    write_bytes(join(output, MANIFEST), manifest.model_dump_json(indent=2).encode())
    _tidy(output, ours, manifest)
    log.info(
        f"[biglearn] dataset {name} committed at {output}: " + ", ".join(f"{s} {manifest.rows(s)} rows" for s in plan)
    )
    return manifest


def _convert(source: Source, output: str, fingerprint: str, todo: list, workers: int):
    if workers == 0 or len(todo) <= 1:
        for split, index, rows in todo:
            yield (split, index), write_shard(source, output, fingerprint, split, index, rows)
        return
    # spawn, not fork: pyarrow's S3 client keeps threads that a forked child would inherit broken.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_adopt, initargs=(source, os.getpid())) as pool:
        futures = {
            pool.submit(_write_adopted, output, fingerprint, split, index, rows): (split, index)
            for split, index, rows in todo
        }
        for future in as_completed(futures):
            yield futures[future], future.result()


_adopted: Source | None = None


def _adopt(source: Source, parent: int) -> None:
    """Worker initializer: the source is sent once per process, not once per shard. The worker
    exits when its parent does, however the parent died (a killed conversion leaves no workers)."""
    global _adopted
    _adopted = source
    threading.Thread(target=_exit_with, args=(parent,), name="biglearn-parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _write_adopted(output: str, fingerprint: str, split: str, index: int, rows: np.ndarray) -> Shard:
    assert _adopted is not None  # set by _adopt, the pool's initializer
    return write_shard(_adopted, output, fingerprint, split, index, rows)


def write_shard(source: Source, output: str, fingerprint: str, split: str, index: int, rows: np.ndarray) -> Shard:
    """Converts `rows`, writes them as one Parquet shard, then its receipt. A receipt without a
    shard goes first, so that a shard file cut off from its receipt by a kill is still known as ours."""
    buffer = io.BytesIO()
    pq.write_table(encode_table(source.rows(rows)), buffer)
    data = buffer.getvalue()
    path = _shard_name(split, index)
    write_bytes(join(output, f"{RECEIPTS}/{path}.json"), json.dumps({"plan": fingerprint, "shard": None}).encode())
    write_bytes(join(output, path), data)
    shard = Shard(path=path, rows=len(rows), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    receipt = {"plan": fingerprint, "shard": shard.model_dump()}
    write_bytes(join(output, f"{RECEIPTS}/{path}.json"), json.dumps(receipt).encode())
    return shard


def _receipt(output: str, existing: dict[str, int], path: str, fingerprint: str, rows: int) -> Shard | None:
    """The shard already written under this plan, if its receipt and file agree."""
    receipt_path = f"{RECEIPTS}/{path}.json"
    if receipt_path not in existing or path not in existing:
        return None
    try:
        receipt = json.loads(read_bytes(join(output, receipt_path)))
        shard = Shard.model_validate(receipt["shard"])
    except (ValueError, KeyError, TypeError):
        return None
    if receipt.get("plan") != fingerprint or shard.rows != rows or existing[path] != shard.bytes:
        return None
    return shard


def _ours(output: str, existing: dict[str, int]) -> set[str]:
    """The files among `existing` that biglearn wrote: the manifest and the shards it lists,
    receipts and the shards they name (of any conversion)."""
    ours = set()
    for manifest in (MANIFEST, REPLACED):
        if manifest in existing:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                splits = json.loads(read_bytes(join(output, manifest)))["splits"].values()
                ours |= {shard["path"] for shards in splits for shard in shards}
    for path in existing:
        if path.startswith(f"{RECEIPTS}/") and path.endswith(".json"):
            ours |= {path, path[len(RECEIPTS) + 1 : -len(".json")]}
    return (ours | {MANIFEST}) & set(existing)


def _without_staging_leftovers(output: str, existing: dict[str, int]) -> dict[str, int]:
    """`existing` less the staging files of local writes cut short (`<name>.<32 hex>.partial`),
    which are deleted."""
    kept = {}
    for path, size in existing.items():
        if STAGING.fullmatch(path.rsplit("/", 1)[-1]):
            delete_file(join(output, path))
        else:
            kept[path] = size
    return kept


def _tidy(output: str, ours: set[str], manifest: Manifest) -> None:
    """Removes receipts, and the shards among `ours` that the committed manifest does not list."""
    listed = {shard.path for shards in manifest.splits.values() for shard in shards}
    for path in ours - listed - {MANIFEST}:
        if not path.startswith(f"{RECEIPTS}/"):
            delete_file(join(output, path))
    delete_dir(join(output, RECEIPTS))


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def _fingerprint(source: Source, validation_fraction: float, seed: int, rows_per_shard: int) -> str:
    plan = {
        "source": source.identity(),
        "validation_fraction": validation_fraction,
        "seed": seed,
        "rows_per_shard": rows_per_shard,
        "format": 1,
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()
