"""The dataset layer: shards then manifest, and shard checks that name the bad file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

import biglearn.data.manifest as manifest_module
from biglearn.data.digits import ensure_digits
from biglearn.data.manifest import (
    DatasetError,
    Geometry,
    read_manifest,
    read_split,
    verify_shards,
    write_dataset,
)


def toy_splits():
    rng = np.random.default_rng(0)
    return {
        "train": {"values": rng.integers(0, 9, (25, 6)).astype(np.int16), "label": np.arange(25, dtype=np.int16)},
        "validation": {"values": rng.integers(0, 9, (4, 6)).astype(np.int16), "label": np.arange(4, dtype=np.int16)},
    }


def write_toy(root: Path):
    geometry = Geometry(height=2, width=3)
    return write_dataset(str(root), "toy", toy_splits(), kind="discrete", vocab_size=9, geometry=geometry,
                         rows_per_shard=10)


class RecordingFS:
    """Delegates to a real filesystem and records the order in which files are written."""

    def __init__(self, fs, written):
        self._fs, self._written = fs, written

    def open_output_stream(self, path, *args, **kwargs):
        self._written.append(path)
        return self._fs.open_output_stream(path, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._fs, name)


def test_write_dataset_writes_shards_then_the_manifest(tmp_path, monkeypatch):
    written: list[str] = []
    real_resolve = manifest_module.resolve
    monkeypatch.setattr(manifest_module, "resolve", lambda uri: (RecordingFS(real_resolve(uri)[0], written),
                                                                 real_resolve(uri)[1]))
    root = tmp_path / "toy"
    manifest = write_toy(root)
    names = [Path(p).name for p in written]
    assert names[-1] == "manifest.json" and names.count("manifest.json") == 1
    assert sorted(names[:-1]) == [f"train-0000{i}.parquet" for i in range(3)] + ["validation-00000.parquet"]

    monkeypatch.undo()
    assert read_manifest(str(root)) == manifest
    assert manifest.length == 6 and manifest.rows("train") == 25 and manifest.rows("validation") == 4
    assert [s.rows for s in manifest.split("train")] == [10, 10, 5]
    assert manifest.grid == (2, 3) and manifest.columns == ["values", "label"]
    for shard in manifest.split("train"):
        data = (root / shard.path).read_bytes()
        assert shard.bytes == len(data) and shard.sha256 == hashlib.sha256(data).hexdigest()
    back = read_split(str(root), manifest, "train", ["values", "label"])
    assert np.array_equal(back["values"], toy_splits()["train"]["values"])
    assert np.array_equal(back["label"], toy_splits()["train"]["label"])
    with pytest.raises(DatasetError, match="no split 'test'"):
        manifest.split("test")


def test_read_manifest_refuses_incomplete_and_missing_datasets(tmp_path):
    root = tmp_path / "toy"
    write_toy(root)
    (root / "manifest.json").unlink()  # as if the writer died before the commit
    with pytest.raises(DatasetError, match="incomplete"):
        read_manifest(str(root))
    with pytest.raises(DatasetError, match="does not exist"):
        read_manifest(str(tmp_path / "nowhere"))
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not a valid manifest"):
        read_manifest(str(root))


def test_rewriting_withdraws_the_old_manifest_first(tmp_path, monkeypatch):
    root = tmp_path / "toy"
    write_toy(root)

    def die(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(manifest_module.pq, "write_table", die)  # the rewrite dies before any shard
    with pytest.raises(OSError):
        write_toy(root)
    monkeypatch.undo()
    with pytest.raises(DatasetError, match="incomplete"):
        read_manifest(str(root))
    manifest = write_toy(root)  # and a complete rewrite commits again
    assert read_manifest(str(root)) == manifest


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    elif how == "flipped":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "flipped", "deleted"])
def test_verify_shards_names_the_bad_shard(tmp_path, how):
    root = tmp_path / "toy"
    manifest = write_toy(root)
    verify_shards(str(root), manifest, ["train", "validation"])  # a good dataset passes
    bad = root / manifest.split("train")[1].path
    _damage(bad, how)
    verify_shards(str(root), manifest, ["validation"])  # other splits are unaffected
    with pytest.raises(DatasetError) as info:
        verify_shards(str(root), manifest, ["train"])
    message = str(info.value)
    assert str(bad) in message, message
    for other in manifest.split("train"):
        if other.path != bad.name:
            assert other.path not in message
    assert ("missing" if how == "deleted" else "corrupted") in message


def test_ensure_digits_writes_once(tmp_path):
    root = tmp_path / "digits"
    manifest = ensure_digits(root)
    assert manifest.rows("train") == 1437 and manifest.rows("validation") == 360
    assert manifest.length == 64 and manifest.vocab_size == 17 and manifest.grid == (8, 8)
    verify_shards(str(root), manifest, ["train", "validation"])
    for split, rows in (("train", 1437), ("validation", 360)):
        data = read_split(str(root), manifest, split, ["values", "label"])
        assert data["values"].shape == (rows, 64)
        assert data["values"].min() >= 0 and data["values"].max() <= 16
        assert set(np.unique(data["label"]).tolist()) == set(range(10))

    stamps = {p.name: os.stat(p).st_mtime_ns for p in root.iterdir()}
    again = ensure_digits(root)
    assert again == manifest
    assert {p.name: os.stat(p).st_mtime_ns for p in root.iterdir()} == stamps  # nothing rewritten
