"""Datasets on disk or object storage: Parquet shards plus `manifest.json`, written last.

The manifest's presence is the commit: a folder without one is an incomplete dataset and is
refused. Readers check every shard they use against the manifest (size, sha256, rows) and name
the bad shard when one does not match.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import NonNegativeInt, PositiveInt

from biglearn.config import Config

MANIFEST = "manifest.json"
VALUES = "values"


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the file and what to do."""


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

    @property
    def grid(self) -> tuple[int, int] | None:
        return self.geometry.grid if self.geometry else None

    def rows(self, split: str) -> int:
        return sum(shard.rows for shard in self.split(split))

    def split(self, split: str) -> list[Shard]:
        if split not in self.splits:
            raise DatasetError(f"dataset {self.name!r} has no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[split]


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI pyarrow understands."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), str(uri)


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def write_dataset(
    uri: str,
    name: str,
    splits: dict[str, dict[str, np.ndarray]],
    *,
    kind: Literal["discrete", "continuous"],
    vocab_size: int | None = None,
    geometry: Geometry | None = None,
    rows_per_shard: int = 100_000,
) -> Manifest:
    """Writes each split as Parquet shards, then the manifest (the commit) last.

    splits: {split: {column: array}}; the `values` column is [N, L], others [N].
    """
    fs, root = resolve(uri)
    fs.create_dir(root, recursive=True)
    if fs.get_file_info(join(root, MANIFEST)).type == pafs.FileType.File:
        # Rewriting in place: withdraw the old commit first, so a write that dies half-way
        # leaves an incomplete dataset rather than an old manifest over new shards.
        fs.delete_file(join(root, MANIFEST))
    entries: dict[str, list[Shard]] = {}
    length = None
    columns: list[str] = []
    for split, table_columns in splits.items():
        values = table_columns[VALUES]
        length = values.shape[1]
        columns = list(table_columns)
        entries[split] = []
        for index, start in enumerate(range(0, max(len(values), 1), rows_per_shard)):
            stop = start + rows_per_shard
            table = pa.table({col: _column(arr[start:stop]) for col, arr in table_columns.items()})
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            data = buffer.getvalue()
            rel = f"{split}-{index:05d}.parquet"
            with fs.open_output_stream(join(root, rel)) as out:
                out.write(data)
            entries[split].append(
                Shard(path=rel, rows=table.num_rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
            )
    manifest = Manifest(
        name=name, kind=kind, length=length, vocab_size=vocab_size, geometry=geometry, columns=columns, splits=entries
    )
    with fs.open_output_stream(join(root, MANIFEST)) as out:
        out.write(manifest.model_dump_json(indent=2).encode())
    return manifest


def _column(array: np.ndarray) -> pa.Array:
    if array.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
    return pa.array(array)


def read_manifest(uri: str) -> Manifest:
    fs, root = resolve(uri)
    path = join(root, MANIFEST)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            raise DatasetError(f"dataset {uri} does not exist (no such folder); check data.path")
        raise DatasetError(
            f"{uri} has no {MANIFEST}: the dataset is incomplete (an interrupted write?); "
            "prepare it again"
        )
    with fs.open_input_stream(path) as stream:
        raw = stream.read()
    try:
        return Manifest.model_validate(json.loads(raw))
    except ValueError as exc:
        raise DatasetError(f"{join(uri, MANIFEST)} is not a valid manifest: {exc}") from None


def verify_shards(uri: str, manifest: Manifest, splits: Iterable[str]) -> None:
    """Checks every shard of `splits` against the manifest: size, sha256 and row count."""
    fs, root = resolve(uri)
    for split in splits:
        for shard in manifest.split(split):
            _verify_shard(fs, root, uri, shard, manifest)


def _verify_shard(fs: pafs.FileSystem, root: str, uri: str, shard: Shard, manifest: Manifest) -> None:
    where = join(uri, shard.path)
    try:
        with fs.open_input_stream(join(root, shard.path)) as stream:
            data = stream.read()
    except FileNotFoundError:
        raise DatasetError(f"shard {where} listed in the manifest is missing; prepare the dataset again") from None
    if len(data) != shard.bytes or hashlib.sha256(data).hexdigest() != shard.sha256:
        raise DatasetError(
            f"shard {where} is corrupted: its size or sha256 does not match the manifest "
            f"({len(data)} bytes, expected {shard.bytes}); prepare the dataset again"
        )
    try:
        meta = pq.ParquetFile(io.BytesIO(data)).metadata
    except pa.ArrowException as exc:
        raise DatasetError(f"shard {where} is not readable Parquet: {exc}") from None
    if meta.num_rows != shard.rows:
        raise DatasetError(f"shard {where} holds {meta.num_rows} rows, the manifest says {shard.rows}")
    missing = set(manifest.columns) - set(meta.schema.to_arrow_schema().names)
    if missing:
        raise DatasetError(f"shard {where} lacks column(s) {sorted(missing)} that the manifest declares")


def shard_uris(uri: str, manifest: Manifest, split: str) -> list[str]:
    return [join(uri, shard.path) for shard in manifest.split(split)]


def read_split(uri: str, manifest: Manifest, split: str, columns: list[str] = (VALUES,)) -> dict[str, np.ndarray]:
    """Reads a whole (small) split into memory: for evaluation, not for training."""
    fs, root = resolve(uri)
    tables = [pq.read_table(join(root, s.path), filesystem=fs, columns=list(columns)) for s in manifest.split(split)]
    table = pa.concat_tables(tables)
    out = {}
    for col in columns:
        chunked = table.column(col).combine_chunks()
        if pa.types.is_fixed_size_list(chunked.type):
            out[col] = chunked.flatten().to_numpy().reshape(len(chunked), chunked.type.list_size).copy()
        else:
            out[col] = chunked.to_numpy()
    return out
