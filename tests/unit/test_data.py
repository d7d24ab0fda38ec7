"""The dataset layer: a seeded split into shards, the manifest written last, resumable writes,
and shard checks that name the bad file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

import biglearn.data.prepare as prepare_module
from biglearn.data.digits import ensure_digits
from biglearn.data.manifest import DatasetError, Geometry, read_manifest, read_split, verify_shards
from biglearn.data.prepare import split_plan, write_source
from biglearn.data.sources import ArraySource


def toy_source(rows: int = 29) -> ArraySource:
    rng = np.random.default_rng(0)
    columns = {"values": rng.integers(0, 9, (rows, 6)).astype(np.int16), "label": np.arange(rows, dtype=np.int16)}
    return ArraySource("toy", columns, vocab_size=9, geometry=Geometry(height=2, width=3))


def write_toy(root: Path, source: ArraySource | None = None, **options):
    options = {"name": "toy", "validation_fraction": 0.15, "seed": 3, "rows_per_shard": 10, **options}
    return write_source(source or toy_source(), str(root), **options)


def test_split_plan_is_a_seeded_partition():
    plan = split_plan(103, 0.2, seed=7, rows_per_shard=25)
    rows = {split: np.concatenate(parts) for split, parts in plan.items()}
    assert len(rows["validation"]) == 21 and len(rows["train"]) == 82  # ceil(0.2 * 103) validation
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(103))
    assert [len(p) for p in plan["train"]] == [25, 25, 25, 7]
    again = split_plan(103, 0.2, seed=7, rows_per_shard=25)
    assert all(np.array_equal(a, b) for a, b in zip(plan["train"], again["train"]))
    other = split_plan(103, 0.2, seed=8, rows_per_shard=25)
    assert not np.array_equal(np.concatenate(plan["validation"]), np.concatenate(other["validation"]))


def test_write_source_writes_shards_then_the_manifest(tmp_path, monkeypatch):
    written: list[str] = []
    real_write = prepare_module.write_bytes
    monkeypatch.setattr(prepare_module, "write_bytes", lambda uri, data: (written.append(uri), real_write(uri, data)))
    root = tmp_path / "toy"
    manifest = write_toy(root)
    names = [Path(p).name for p in written]
    assert names[-1] == "manifest.json" and names.count("manifest.json") == 1
    shards = sorted(n for n in names if n.endswith(".parquet"))
    assert shards == [f"train-0000{i}.parquet" for i in range(3)] + ["validation-00000.parquet"]
    assert not (root / "_receipts").exists()  # receipts are gone once committed

    assert read_manifest(str(root)) == manifest
    assert manifest.rows("train") == 24 and manifest.rows("validation") == 5
    assert [s.rows for s in manifest.split("train")] == [10, 10, 4]
    assert manifest.grid == (2, 3) and manifest.columns == ["values", "label"] and manifest.plan
    for shard in manifest.split("train"):
        data = (root / shard.path).read_bytes()
        assert shard.bytes == len(data) and shard.sha256 == hashlib.sha256(data).hexdigest()
    source = toy_source()
    for split in ("train", "validation"):
        back = read_split(str(root), manifest, split, ["values", "label"])
        assert np.array_equal(back["values"], source.columns["values"][back["label"]])  # rows intact
    assert sorted(
        np.concatenate(
            [read_split(str(root), manifest, s, ["label"])["label"] for s in ("train", "validation")]
        ).tolist()
    ) == list(range(29))
    with pytest.raises(DatasetError, match="no split 'test'"):
        manifest.split("test")


def test_an_interrupted_write_leaves_no_manifest_and_a_rerun_completes_it(tmp_path, monkeypatch):
    root = tmp_path / "toy"
    converted: list[str] = []
    real_write_shard = prepare_module.write_shard

    def dies_on_third(source, output, fingerprint, split, index, rows):
        if len(converted) == 2:
            raise OSError("killed")
        converted.append(f"{split}-{index}")
        return real_write_shard(source, output, fingerprint, split, index, rows)

    monkeypatch.setattr(prepare_module, "write_shard", dies_on_third)
    with pytest.raises(OSError):
        write_toy(root)
    with pytest.raises(DatasetError, match="incomplete"):
        read_manifest(str(root))
    done_first = list(converted)

    converted.clear()
    monkeypatch.setattr(
        prepare_module, "write_shard", lambda *a: (converted.append(f"{a[3]}-{a[4]}"), real_write_shard(*a))[1]
    )
    manifest = write_toy(root)
    assert len(converted) == 2 and not set(converted) & set(done_first)  # only the missing shards
    labels = np.concatenate([read_split(str(root), manifest, s, ["label"])["label"] for s in ("train", "validation")])
    assert sorted(labels.tolist()) == list(range(29))  # every row exactly once
    assert manifest == write_toy(tmp_path / "fresh")  # the same as an uninterrupted write


def test_a_committed_dataset_is_kept_unless_overwrite_is_asked(tmp_path):
    root = tmp_path / "toy"
    manifest = write_toy(root)
    stamps = {p.name: os.stat(p).st_mtime_ns for p in root.iterdir()}
    assert write_toy(root) == manifest  # same plan: nothing to do
    assert {p.name: os.stat(p).st_mtime_ns for p in root.iterdir()} == stamps
    with pytest.raises(DatasetError, match="already holds a different dataset"):
        write_toy(root, seed=4)
    assert read_manifest(str(root)) == manifest  # refused: untouched
    replaced = write_toy(root, seed=4, rows_per_shard=20, overwrite=True)
    assert read_manifest(str(root)) == replaced and replaced.plan != manifest.plan
    assert sorted(p.name for p in root.glob("*.parquet")) == [
        "train-00000.parquet",
        "train-00001.parquet",
        "validation-00000.parquet",
    ]


def test_read_manifest_refuses_incomplete_missing_and_invalid_datasets(tmp_path):
    root = tmp_path / "toy"
    write_toy(root)
    (root / "manifest.json").unlink()  # as if the writer died before the commit
    with pytest.raises(DatasetError, match="incomplete"):
        read_manifest(str(root))
    with pytest.raises(DatasetError, match="no dataset at"):
        read_manifest(str(tmp_path / "nowhere"))
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not a valid manifest"):
        read_manifest(str(root))


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
    assert verify_shards(str(root), manifest, ["train", "validation"]) == 4  # a good dataset passes
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
    assert {"deleted": "missing", "truncated": "truncated", "flipped": "corrupted"}[how] in message


def test_sampled_verification_hashes_within_the_budget_and_still_checks_every_size(tmp_path):
    root = tmp_path / "toy"
    manifest = write_toy(root, source=toy_source(200), rows_per_shard=10)
    shards = manifest.split("train")
    budget = 3 * max(s.bytes for s in shards)
    assert verify_shards(str(root), manifest, ["train"], max_hash_bytes=budget) == 3
    _damage(root / shards[5].path, "truncated")  # whether or not it is sampled, its size gives it away
    with pytest.raises(DatasetError, match=shards[5].path):
        verify_shards(str(root), manifest, ["train"], max_hash_bytes=budget)


def test_a_shard_whose_schema_disagrees_with_the_manifest_is_named(tmp_path):
    root = tmp_path / "toy"
    write_toy(root)
    text = json.loads((root / "manifest.json").read_text())
    text["length"] = 7
    (root / "manifest.json").write_text(json.dumps(text))
    with pytest.raises(DatasetError, match=r"train-00000.parquet does not match the manifest: 'values' is .*list of 7"):
        verify_shards(str(root), read_manifest(str(root)), ["train"])


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


def test_a_folder_holding_files_of_others_is_never_written_into(tmp_path):
    root = tmp_path / "toy"
    root.mkdir()
    (root / "train-00007.parquet").write_bytes(b"someone else's shard")
    (root / "_receipts").mkdir()
    for overwrite in (False, True):
        with pytest.raises(
            DatasetError, match=r"holds files that no biglearn conversion wrote \(train-00007.parquet\)"
        ):
            write_toy(root, overwrite=overwrite)
    assert sorted(p.name for p in root.rglob("*")) == ["_receipts", "train-00007.parquet"]


def test_leftovers_of_a_killed_conversion_are_ours_and_cleaned(tmp_path):
    """A staging file of a write cut short, and a shard whose receipt says it was being written,
    are the conversion's own: the re-run removes or rewrites them and completes the dataset."""
    root = tmp_path / "toy"
    manifest = write_toy(tmp_path / "uninterrupted")
    write_toy(root)
    (root / "manifest.json").unlink()  # killed before the commit, while train-00001 was being written:
    (root / "_receipts").mkdir()
    for split in ("train", "validation"):
        for shard in manifest.split(split):
            receipt = {
                "plan": manifest.plan,
                "shard": None if shard.path == "train-00001.parquet" else shard.model_dump(),
            }
            (root / "_receipts" / f"{shard.path}.json").write_text(json.dumps(receipt))
    (root / "train-00001.parquet").write_bytes(b"half a shard")
    (root / f"validation-00000.parquet.{'ab' * 16}.partial").write_bytes(b"half a write")
    assert write_toy(root) == manifest
    assert not list(root.glob("*.partial")) and not (root / "_receipts").exists()
    verify_shards(str(root), manifest, ["train", "validation"])


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_values_the_manifest_cannot_hold_are_named_before_training(tmp_path, kind):
    root = tmp_path / "toy"
    if kind == "discrete":
        write_toy(root)  # tokens 0..8
        text = json.loads((root / "manifest.json").read_text())
        text["vocab_size"] = 5
        (root / "manifest.json").write_text(json.dumps(text))
        expected = r"train-00000.parquet does not match the manifest: 'values' holds tokens from 0 to 8, outside the vocabulary 0..4"
    else:
        values = np.random.default_rng(0).random((29, 3, 2)).astype(np.float32)
        values[4, 1, 0] = np.nan
        source = ArraySource("toy", {"values": values}, kind="continuous", patch_dim=2, vocab_size=None, geometry=None)
        write_toy(root, source=source, validation_fraction=0.0, rows_per_shard=100)
        expected = r"train-00000.parquet does not match the manifest: 'values' holds 1 non-finite number"
    with pytest.raises(DatasetError, match=expected):
        verify_shards(str(root), read_manifest(str(root)), ["train"])


def test_messages_say_what_is_wrong_and_what_to_do(tmp_path):
    root = tmp_path / "toy"
    manifest = write_toy(root)
    _damage(root / manifest.split("train")[0].path, "flipped")
    with pytest.raises(DatasetError, match="its size is right but its content differs"):
        verify_shards(str(root), manifest, ["train"])
    text = json.loads((root / "manifest.json").read_text())
    text["splits"]["validation"][0]["rows"] += 1
    (root / "manifest.json").write_text(json.dumps(text))
    with pytest.raises(DatasetError, match=r"holds 5 rows, the manifest says 6: the manifest does not describe"):
        verify_shards(str(root), read_manifest(str(root)), ["validation"])
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not a valid manifest .*restore it, or convert the data again"):
        read_manifest(str(root))
