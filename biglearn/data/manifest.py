"""Datasets on disk or object storage: Parquet shards plus `manifest.json`, written last.

The manifest's presence is the commit: a location without one is an incomplete dataset and is
refused. Before training, every shard's presence and size is checked against the manifest (one
listing), and shards are hashed (sha256), counted and schema-checked up to a byte budget:
all of them for datasets within it, a seeded sample (always the first and last shard of each
split) beyond it. A bad shard is named.

Columns: `values` is a fixed-size list per row: L token ids (discrete) or L*P floats
(continuous, P = patch dimension); other columns (labels, attributes) hold one scalar per row.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Iterable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import NonNegativeInt, PositiveInt, ValidationError

from biglearn.config import Config
from biglearn.data.table import MISSING, DatasetError, TableColumn, TableSchema  # noqa: F401 (their home is table.py)
from biglearn.data.storage import StorageError, join, list_files, read_bytes, resolve

MANIFEST = "manifest.json"
VALUES = "values"


class Geometry(Config):
    height: PositiveInt
    width: PositiveInt
    channels: PositiveInt = 1
    patch: PositiveInt = 1

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.patch, self.width // self.patch


class Shard(Config):
    path: str  # relative to the dataset root
    rows: NonNegativeInt
    bytes: NonNegativeInt
    sha256: str


class Manifest(Config):
    name: str
    kind: Literal["discrete", "continuous"]
    length: PositiveInt
    vocab_size: PositiveInt | None = None
    patch_dim: PositiveInt | None = None
    geometry: Geometry | None = None
    columns: list[str]
    splits: dict[str, list[Shard]]
    plan: str | None = None
    """Fingerprint of the conversion that wrote the dataset: its input, options and split."""
    table: TableSchema | None = None
    """A table's columns (one position each): types, bin edges, categories, token ranges.
    Its `values` hold MISSING (-1) where a cell is missing."""

    @property
    def grid(self) -> tuple[int, int] | None:
        return self.geometry.grid if self.geometry else None

    def rows(self, split: str) -> int:
        return sum(shard.rows for shard in self.split(split))

    def split(self, split: str) -> list[Shard]:
        if split not in self.splits:
            raise DatasetError(f"dataset {self.name!r} has no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[split]


def read_manifest(uri: str) -> Manifest:
    try:
        raw = read_bytes(join(uri, MANIFEST))
    except FileNotFoundError:
        if not list_files(uri):
            raise DatasetError(
                f"no dataset at {uri}: it does not exist or is empty; check data.path (convert data with "
                "jobs/prepare_data.py), or leave data.path unset to train on the embedded digits"
            ) from None
        raise DatasetError(
            f"{uri} has no {MANIFEST}: the dataset is incomplete (an interrupted write?); "
            "run prepare_data again to complete it"
        ) from None
    except StorageError as exc:
        raise DatasetError(str(exc)) from None
    try:
        return Manifest.model_validate(json.loads(raw))
    except ValueError as exc:
        raise DatasetError(
            f"{join(uri, MANIFEST)} is not a valid manifest ({_first_line(exc)}): it was changed or damaged after "
            "jobs/prepare_data.py wrote it; restore it, or convert the data again into an empty folder"
        ) from None


def _first_line(exc: Exception) -> str:
    """A validation or JSON error in one line."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(part) for part in first['loc']) or 'the document'}: {first['msg']}"
    return str(exc).strip().splitlines()[0]


def verify_shards(uri: str, manifest: Manifest, splits: Iterable[str], max_hash_bytes: int | None = None, seed: int = 0) -> int:
    """Checks the shards of `splits` against the manifest; returns how many were hashed.

    Every shard: present, with the recorded size. Hashed shards (all when their total is within
    `max_hash_bytes` or it is None, else a seeded sample within it): sha256, rows and schema.
    """
    shards = [shard for split in splits for shard in manifest.split(split)]
    try:
        sizes = list_files(uri)
    except StorageError as exc:
        raise DatasetError(str(exc)) from None
    for shard in shards:
        where = join(uri, shard.path)
        if shard.path not in sizes:
            raise DatasetError(f"shard {where} listed in the manifest is missing; run prepare_data again")
        if sizes[shard.path] != shard.bytes:
            raise DatasetError(
                f"shard {where} is corrupted or truncated: {sizes[shard.path]} bytes, the manifest says "
                f"{shard.bytes}; run prepare_data again"
            )
    chosen = _hash_sample(shards, max_hash_bytes, seed)
    for shard in chosen:
        _verify_content(uri, shard, manifest)
    return len(chosen)


def _hash_sample(shards: list[Shard], max_hash_bytes: int | None, seed: int) -> list[Shard]:
    if max_hash_bytes is None or sum(s.bytes for s in shards) <= max_hash_bytes:
        return shards
    order = np.random.default_rng(seed).permutation(len(shards)).tolist()
    chosen, budget = [], max_hash_bytes
    for index in [0, len(shards) - 1, *order]:
        shard = shards[index]
        if shard not in chosen and (shard.bytes <= budget or not chosen):
            chosen.append(shard)
            budget -= shard.bytes
    return chosen


def _verify_content(uri: str, shard: Shard, manifest: Manifest) -> None:
    where = join(uri, shard.path)
    try:
        data = read_bytes(where)
    except FileNotFoundError:
        raise DatasetError(f"shard {where} listed in the manifest is missing; run prepare_data again") from None
    except StorageError as exc:
        raise DatasetError(str(exc)) from None
    if len(data) != shard.bytes:
        raise DatasetError(
            f"shard {where} is corrupted or truncated: {len(data)} bytes, the manifest says {shard.bytes}; "
            "run prepare_data again"
        )
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise DatasetError(
            f"shard {where} is corrupted: its size is right but its content differs from what was written "
            "(sha256 mismatch); run prepare_data again"
        )
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
    except pa.ArrowException as exc:
        raise DatasetError(f"shard {where} is not readable Parquet: {exc}") from None
    if parquet.metadata.num_rows != shard.rows:
        raise DatasetError(
            f"shard {where} holds {parquet.metadata.num_rows} rows, the manifest says {shard.rows}: the manifest "
            "does not describe this shard; run prepare_data again (with overwrite=true) to rewrite both"
        )
    problem = schema_mismatch(parquet.metadata.schema.to_arrow_schema(), manifest)
    if problem is None:
        problem = values_out_of_range(parquet.read(columns=[VALUES]).column(VALUES), manifest)
    if problem:
        raise DatasetError(f"shard {where} does not match the manifest: {problem}; run prepare_data again")


def values_out_of_range(values: pa.ChunkedArray, manifest: Manifest) -> str | None:
    """What is wrong with a shard's values for this manifest (missing values, tokens outside the
    vocabulary, non-finite numbers), or None."""
    flat = pa.concat_arrays([chunk.flatten() for chunk in values.chunks]) if values.num_chunks else pa.array([], pa.int64())
    if values.null_count or flat.null_count:
        return f"'{VALUES}' has {values.null_count + flat.null_count} missing value(s)"
    numbers = flat.to_numpy(zero_copy_only=False)
    if not len(numbers):
        return None
    if manifest.table is not None:
        tokens_NL = numbers.reshape(-1, manifest.length)
        for position, (column, (start, end)) in enumerate(zip(manifest.table.columns, manifest.table.position_vocab)):
            tokens = tokens_NL[:, position]
            bad = (tokens != MISSING) & ((tokens < start) | (tokens >= end))
            if bad.any():
                return (f"column {column.name!r} holds token {int(tokens[bad][0])} (row {int(np.flatnonzero(bad)[0])}), "
                        f"outside its range {start}..{end - 1}")
        return None
    if manifest.kind == "discrete":
        low, high = int(numbers.min()), int(numbers.max())
        if low < 0 or high >= (manifest.vocab_size or 0):
            return (f"'{VALUES}' holds tokens from {low} to {high}, outside the vocabulary 0..{(manifest.vocab_size or 0) - 1} "
                    "(manifest vocab_size)")
        return None
    bad = int((~np.isfinite(numbers)).sum())
    return f"'{VALUES}' holds {bad} non-finite number(s) (NaN or infinity)" if bad else None


def schema_mismatch(schema: pa.Schema, manifest: Manifest) -> str | None:
    """What is wrong with a shard's schema for this manifest, or None."""
    missing = set(manifest.columns) - set(schema.names)
    if missing:
        return f"it lacks column(s) {sorted(missing)}"
    values = schema.field(VALUES).type
    width = manifest.length * (manifest.patch_dim or 1)
    if not pa.types.is_fixed_size_list(values) or values.list_size != width:
        return f"'{VALUES}' is {values}, the manifest needs a fixed-size list of {width} per row"
    wanted = pa.types.is_integer if manifest.kind == "discrete" else pa.types.is_floating
    if not wanted(values.value_type):
        return f"'{VALUES}' holds {values.value_type}, which does not fit {manifest.kind} data"
    return None


def encode_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """Columns as an Arrow table: `values` [N, L] or [N, L, P] becomes a fixed-size list per row."""
    return pa.table({name: _column(array) for name, array in columns.items()})


def _column(array: np.ndarray) -> pa.Array:
    if array.ndim >= 2:
        flat = array.reshape(len(array), -1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    return pa.array(array)


def shard_uris(uri: str, manifest: Manifest, split: str) -> list[str]:
    return [join(uri, shard.path) for shard in manifest.split(split)]


def read_split(uri: str, manifest: Manifest, split: str, columns: Sequence[str] = (VALUES,)) -> dict[str, np.ndarray]:
    """Reads a whole (small) split into memory: for evaluation, not for training.

    `values` comes back as [N, L] (discrete) or [N, L, P] (continuous).
    """
    fs, root = resolve(uri)
    tables = [pq.read_table(join(root, s.path), filesystem=fs, columns=list(columns)) for s in manifest.split(split)]
    table = pa.concat_tables(tables)
    out = {}
    for col in columns:
        chunked = table.column(col).combine_chunks()
        if pa.types.is_fixed_size_list(chunked.type):
            shape = (len(chunked), manifest.length, manifest.patch_dim) if manifest.patch_dim else (len(chunked), -1)
            out[col] = chunked.flatten().to_numpy().reshape(shape).copy()
        else:
            out[col] = chunked.to_numpy()
    return out
