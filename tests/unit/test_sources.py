"""Converters on files the tests write in the real formats: IDX (the MNIST header layout, raw and
gzip), PNG/JPEG folders with CelebA-style and CSV attributes, UTF-8 text, and the mixtures."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biglearn.data.manifest import DatasetError, read_split
from biglearn.data.prepare import PrepareConfig, prepare_dataset
from biglearn.data.sources import GmmInput, GmmSource, ImageFolderInput, gmm_modes, open_source

REPO = Path(__file__).resolve().parents[2]


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """The IDX layout: 0x00 0x00, type 0x08 (ubyte), ndim, big-endian int32 sizes, then the data."""
    data = (
        bytes([0, 0, 0x08, array.ndim])
        + struct.pack(f">{array.ndim}i", *array.shape)
        + array.astype(np.uint8).tobytes()
    )
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def prepare(tmp_path: Path, source: dict, **options):
    cfg = PrepareConfig.model_validate({"source": source, "output": str(tmp_path / "out"), "workers": 0, **options})
    manifest = prepare_dataset(cfg)
    data = {split: read_split(cfg.output, manifest, split, manifest.columns) for split in manifest.splits}
    return manifest, data


def by_label(data: dict) -> dict[int, np.ndarray]:
    """Rows keyed by their label column, whichever split they landed in."""
    return {int(label): v for split in data.values() for label, v in zip(split["label"], split["values"])}


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_become_quantised_tokens_with_labels(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 8, 12), dtype=np.uint8)
    images_path = write_idx(tmp_path / "train-images-idx3-ubyte", images, gz)
    labels_path = write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(30) % 256, gz)
    source = {"kind": "idx", "images": str(images_path), "labels": str(labels_path), "levels": 16}
    manifest, data = prepare(tmp_path, source, validation_fraction=0.2, rows_per_shard=7)
    assert (manifest.kind, manifest.length, manifest.vocab_size, manifest.grid) == ("discrete", 96, 16, (8, 12))
    assert manifest.rows("train") == 24 and manifest.rows("validation") == 6
    for label, values in by_label(data).items():
        assert np.array_equal(values, images[label].reshape(-1) // 16)


def test_idx_images_become_continuous_patches(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (10, 8, 12), dtype=np.uint8)
    labels = write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(10))
    source = {
        "kind": "idx",
        "images": str(write_idx(tmp_path / "train-images-idx3-ubyte", images)),
        "labels": str(labels),
        "encoding": "patches",
        "patch": 4,
    }
    manifest, data = prepare(tmp_path, source)
    assert (manifest.kind, manifest.length, manifest.patch_dim, manifest.grid) == ("continuous", 6, 16, (2, 3))
    for label, patches in by_label(data).items():
        expected = images[label].astype(np.float32) / 127.5 - 1  # patch (r, c) holds rows 4r.., cols 4c..
        assert patches.shape == (6, 16)
        assert np.allclose(patches[1 * 3 + 2], expected[4:8, 8:12].reshape(-1))


def test_idx_errors_name_the_file(tmp_path):
    images = np.zeros((5, 4, 4), dtype=np.uint8)
    bad_magic = tmp_path / "train-images-idx3-ubyte"
    bad_magic.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">i", 80) + images.tobytes())
    with pytest.raises(DatasetError, match=rf"{bad_magic} is not an IDX file.*00 00 08 01.*expected 00 00 08 03"):
        prepare(tmp_path, {"kind": "idx", "images": str(bad_magic)})
    truncated = write_idx(tmp_path / "t-images", images)
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(DatasetError, match="truncated"):
        prepare(tmp_path, {"kind": "idx", "images": str(truncated)})
    good = write_idx(tmp_path / "g-images", images)
    labels = write_idx(tmp_path / "labels", np.arange(4))
    with pytest.raises(DatasetError, match="4 labels for 5 images"):
        prepare(tmp_path, {"kind": "idx", "images": str(good), "labels": str(labels)})
    assert not (tmp_path / "out" / "manifest.json").exists()


def make_faces(folder: Path, count: int = 12, size=(10, 10), mode="RGB") -> list[str]:
    names = []
    for i in range(count):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        suffix = ".png" if i % 3 else ".jpg"
        name = f"{i:06d}{suffix}"
        colour = (i * 20, 255 - i * 20, 7) if mode == "RGB" else i * 20
        Image.new(mode, size, colour).save(sub / name)
        names.append(name)
    return names


def celeba_attributes(path: Path, names: list[str]) -> Path:
    lines = [str(len(names)), "Smiling Young"] + [f"{n} {1 if i % 2 else -1}  {i % 3 - 1}" for i, n in enumerate(names)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_image_folder_with_celeba_attributes_becomes_patches(tmp_path):
    names = make_faces(tmp_path / "faces")
    attrs = celeba_attributes(tmp_path / "list_attr_celeba.txt", names)
    source = {
        "kind": "images",
        "folder": str(tmp_path / "faces"),
        "resolution": 8,
        "encoding": "patches",
        "patch": 4,
        "attributes": str(attrs),
    }
    manifest, data = prepare(tmp_path, source, validation_fraction=0.25)
    assert (manifest.length, manifest.patch_dim, manifest.geometry.channels) == (4, 48, 3)
    assert manifest.columns == ["values", "Smiling", "Young"]
    rows = {split: len(d["values"]) for split, d in data.items()}
    assert rows == {"train": 9, "validation": 3}
    for split in data.values():
        for patches, smiling, young in zip(split["values"], split["Smiling"], split["Young"]):
            red = (patches[0].reshape(4, 4, 3)[..., 0].mean() + 1) * 127.5  # a flat colour: R = 20 i
            i = int(round(red / 20))
            assert smiling == (1 if i % 2 else -1) and young == i % 3 - 1  # attributes follow their image


def test_an_image_folder_with_a_csv_becomes_grayscale_tokens(tmp_path):
    names = make_faces(tmp_path / "faces", count=6, mode="L")
    csv = tmp_path / "attrs.csv"
    csv.write_text("file,odd\n" + "".join(f"{n},{int(n[5]) % 2}\n" for n in names))
    source = {"kind": "images", "folder": str(tmp_path / "faces"), "attributes": str(csv), "levels": 256}
    manifest, data = prepare(tmp_path, source, validation_fraction=0)
    assert (manifest.kind, manifest.length, manifest.vocab_size) == ("discrete", 100, 256)
    values, odd = data["train"]["values"], data["train"]["odd"]
    assert np.array_equal(odd, (values[:, 0] // 20) % 2)


def test_bad_image_folders_get_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no PNG or JPEG images under"):
        prepare(tmp_path, {"kind": "images", "folder": str(tmp_path / "empty")})
    make_faces(tmp_path / "mixed", count=3, size=(10, 10))
    Image.new("RGB", (12, 10)).save(tmp_path / "mixed" / "odd.png")
    with pytest.raises(DatasetError, match=r"mixed sizes: .*12x10 \(e.g. odd.png\).*set source.resolution"):
        prepare(tmp_path, {"kind": "images", "folder": str(tmp_path / "mixed"), "encoding": "patches", "patch": 2})
    make_faces(tmp_path / "modes", count=3)
    Image.new("L", (10, 10)).save(tmp_path / "modes" / "gray.png")
    with pytest.raises(DatasetError, match=r"mode\(s\) .*L \(e.g. gray.png\); set source.mode"):
        prepare(tmp_path, {"kind": "images", "folder": str(tmp_path / "modes"), "encoding": "patches", "patch": 2})
    # told to convert, the same folder goes through
    manifest, _ = prepare(tmp_path, {"kind": "images", "folder": str(tmp_path / "modes"), "mode": "L"})
    assert manifest.vocab_size == 256
    names = make_faces(tmp_path / "faces", count=4)
    attrs = celeba_attributes(tmp_path / "attrs.txt", names[:3])
    with pytest.raises(DatasetError, match=r"no attributes for 1 image\(s\)"):
        prepare(
            tmp_path,
            {
                "kind": "images",
                "folder": str(tmp_path / "faces"),
                "attributes": str(attrs),
                "encoding": "patches",
                "patch": 5,
            },
        )


def test_text_becomes_byte_windows(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = ["héllo wörld, " * 7, "short", "big cooperative learning " * 3]
    for i, text in enumerate(texts):
        (corpus / f"{i}.txt").write_text(text, encoding="utf-8")
    manifest, data = prepare(
        tmp_path, {"kind": "text", "files": str(corpus), "length": 16, "stride": 8}, validation_fraction=0
    )
    expected = set()
    for text in texts:
        raw = text.encode()
        expected |= {raw[s : s + 16] for s in range(0, len(raw) - 16 + 1, 8)}
    got = [bytes(row.astype(np.uint8)) for row in data["train"]["values"]]
    assert (
        len(got)
        == manifest.rows("train")
        == sum((len(t.encode()) - 16) // 8 + 1 for t in texts if len(t.encode()) >= 16)
    )
    assert set(got) == expected and manifest.vocab_size == 256

    (corpus / "latin1.txt").write_bytes("caf\xe9 au lait, encore".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1.txt is not UTF-8: invalid byte at offset 3"):
        prepare(tmp_path, {"kind": "text", "files": str(corpus)})


def test_gaussian_mixtures_sample_the_papers_modes():
    means, variance = gmm_modes("gmm25")
    assert means.shape == (25, 2) and variance == 0.05 and sorted(set(means[:, 0].tolist())) == [-4, -2, 0, 2, 4]
    source = GmmSource(GmmInput(kind="gmm", num_examples=20_000, seed=1))
    rows = source.rows(np.arange(20_000))
    x, label = rows["values"][:, :, 0], rows["label"]
    assert (x - means[label]).std(0) == pytest.approx([0.05**0.5] * 2, rel=0.05)
    assert np.bincount(label, minlength=25).min() > 20_000 / 25 * 0.8
    assert np.array_equal(source.rows(np.arange(100, 200))["values"], source.rows(np.arange(100, 200))["values"])


def test_parallel_conversion_writes_the_same_dataset(tmp_path):
    names = make_faces(tmp_path / "faces", count=20)
    source = {
        "kind": "images",
        "folder": str(tmp_path / "faces"),
        "encoding": "patches",
        "patch": 5,
        "attributes": str(celeba_attributes(tmp_path / "a.txt", names)),
    }
    serial, _ = prepare(tmp_path / "serial", source, rows_per_shard=4)
    cfg = PrepareConfig.model_validate(
        {"source": source, "output": str(tmp_path / "parallel"), "workers": 2, "rows_per_shard": 4}
    )
    assert prepare_dataset(cfg) == serial  # same shards, same sha256, whatever process wrote them


def test_sources_refuse_missing_inputs(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        with open_source(ImageFolderInput(kind="images", folder=str(tmp_path / "nope"))):
            pass


def test_a_killed_parallel_conversion_leaves_no_processes_and_a_rerun_completes_it(tmp_path):
    import psutil

    output = tmp_path / "digits"
    job = [
        sys.executable,
        str(REPO / "jobs" / "prepare_data.py"),
        "--set",
        "source.kind=digits",
        "--set",
        f"output={output}",
        "--set",
        "workers=2",
        "--set",
        "rows_per_shard=20",
    ]
    parent = subprocess.Popen(job, stdout=subprocess.PIPE, text=True)
    while "rows/s" not in (line := parent.stdout.readline()):  # a shard written
        assert line, "the conversion ended before writing a shard"
    children = psutil.Process(parent.pid).children(recursive=True)
    assert len(children) >= 2  # the pool's workers (and multiprocessing's resource tracker)
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    assert not (output / "manifest.json").exists()
    assert subprocess.run(job, capture_output=True).returncode == 0
    assert (output / "manifest.json").exists() and not (output / "_receipts").exists()
