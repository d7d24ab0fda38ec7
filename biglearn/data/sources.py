"""Real formats as datasets: each source turns row indices into rows of the dataset layout.

Rows are addressable by index, so shards can be converted in any order, in parallel worker
processes, and again after an interruption, always with the same content. Opening a source
checks its input (formats, sizes, modes, attribute coverage) before anything is written.

Sources: MNIST-style IDX files, an image folder (PNG/JPEG, optional CSV or CelebA attributes),
UTF-8 text, the embedded digits, and synthetic Gaussian mixtures. Images become quantised pixel
tokens (grayscale, V = levels) or continuous patches (values scaled to [-1, 1], P = patch *
patch * channels, positions in row-major patch order).

Legend: N = rows, H/W/C = image height/width/channels, L = positions, P = patch dimension.
"""

from __future__ import annotations

import abc
import codecs
import contextlib
import csv
import glob
import gzip
import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Iterator, Literal, Union, cast

import numpy as np
from pydantic import Field, PositiveInt

from biglearn.config import Config
from biglearn.data.manifest import DatasetError, Geometry, TableSchema
from biglearn.data.table import encode, fit_schema
from biglearn.simulate.modes import paper_modes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


# --- configs ---------------------------------------------------------------------------------


class ImageEncoding(Config):
    encoding: Literal["tokens", "patches"] = "tokens"
    """tokens: one quantised grayscale pixel per position; patches: continuous patch vectors."""
    levels: int = Field(default=256, ge=2, le=256)
    """Token vocabulary for `tokens`: 8-bit pixels are quantised into this many levels."""
    patch: PositiveInt = 4
    """Patch side for `patches` (the image side must be a multiple of it)."""


class IdxInput(ImageEncoding):
    kind: Literal["idx"]
    images: str
    """An MNIST-style IDX image file (e.g. train-images-idx3-ubyte, optionally .gz)."""
    labels: str | None = None
    """The matching IDX label file (train-labels-idx1-ubyte[.gz]), stored as a `label` column."""


class ImageFolderInput(ImageEncoding):
    kind: Literal["images"]
    folder: str
    """Searched recursively for .png/.jpg/.jpeg files."""
    resolution: PositiveInt | None = None
    """Resize the shorter side to this and center-crop square; null: all images must share one size."""
    mode: Literal["L", "RGB"] | None = None
    """Convert every image to this mode; null: all images must already share L or RGB."""
    attributes: str | None = None
    """Per-image attributes: a CSV (first column the file name) or CelebA's list_attr_celeba.txt."""


class TextInput(Config):
    kind: Literal["text"]
    files: str
    """A UTF-8 text file, or a folder searched recursively for files."""
    length: PositiveInt = 256
    """Window length in bytes (L); the vocabulary is the 256 byte values."""
    stride: PositiveInt | None = None
    """Step between window starts (default: the length, i.e. no overlap)."""


class DigitsInput(Config):
    kind: Literal["digits"]
    encoding: Literal["tokens", "patches"] = "tokens"
    """tokens: the 0..16 pixels as tokens (V = 17); patches: continuous patches scaled to [0, 1]."""
    patch: PositiveInt = 2
    """Patch side for `patches` (1, 2, 4 or 8)."""


class GmmInput(Config):
    kind: Literal["gmm"]
    mixture: Literal["gmm2", "gmm25"] = "gmm25"
    """gmm2: 1/2 N((-1,0), 0.1 I) + 1/2 N((1,0), 0.1 I); gmm25: 25 equal N(mode, 0.05 I) on {-4,-2,0,2,4}^2."""
    num_examples: PositiveInt = 100_000
    seed: int = 0


class TableInput(Config):
    kind: Literal["table"]
    files: str
    """A CSV, TSV or Parquet file, a folder of them, or a glob (e.g. data/part-*.csv); local or
    s3:// (a file or a prefix). All must have the same columns."""
    columns: list[str] | None = None
    """The columns to keep, in this order (default: all)."""
    categorical: list[str] = []
    """Columns that hold numbers but are categories (codes, ids); text columns are categorical anyway."""
    missing: list[str] = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?"]
    """Cell texts that mean a missing value."""
    bins: int = Field(default=32, ge=2, le=4096)
    """Quantile bins per numeric column (fitted on the training split only)."""


SourceInput = Annotated[Union[IdxInput, ImageFolderInput, TextInput, DigitsInput, GmmInput, TableInput],
                        Field(discriminator="kind")]


# --- sources ---------------------------------------------------------------------------------


class Source(abc.ABC):
    """A dataset to convert: its shape, and `rows(indices)` giving the columns of those rows."""

    name: str
    kind: Literal["discrete", "continuous"] = "discrete"
    length: int
    vocab_size: int | None = None
    patch_dim: int | None = None
    geometry: Geometry | None = None

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def rows(self, indices_N: np.ndarray) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def identity(self) -> dict:
        """What determines the rows: options and input files (names and sizes)."""

    def fit(self, train_rows: np.ndarray) -> None:
        """Learns what encoding needs from the training split's rows (a table's bins); before `rows`."""

    table: TableSchema | None = None
    """A table's columns, once fitted."""


class ArraySource(Source):
    """Rows already in memory (the embedded digits, tests)."""

    def __init__(self, name: str, columns: dict[str, np.ndarray], **shape):
        self.name, self.columns = name, columns
        for key, value in shape.items():
            setattr(self, key, value)
        self.length = columns["values"].shape[1]

    def __len__(self) -> int:
        return len(self.columns["values"])

    def rows(self, indices_N: np.ndarray) -> dict[str, np.ndarray]:
        return {name: array[indices_N] for name, array in self.columns.items()}

    def identity(self) -> dict:
        digest = hashlib.sha256()
        for name, array in self.columns.items():
            digest.update(name.encode() + np.ascontiguousarray(array).tobytes())
        return {"arrays": digest.hexdigest()}


def encode_images(images_NHWC: np.ndarray, options: ImageEncoding) -> np.ndarray:
    """uint8 images [N, H, W, C] -> tokens [N, H*W] (uint8) or patches [N, L, P] (float32)."""
    n, h, w, c = images_NHWC.shape
    if options.encoding == "tokens":
        return (images_NHWC[..., 0].astype(np.uint16) * options.levels // 256).astype(np.uint8).reshape(n, h * w)
    return to_patches(images_NHWC.astype(np.float32) / 127.5 - 1.0, options.patch)


def to_patches(x_NHWC: np.ndarray, patch: int) -> np.ndarray:
    """Images [N, H, W, C] -> patches [N, L, P]: L in row-major patch order, P = patch*patch*C."""
    n, h, w, c = x_NHWC.shape
    p = patch
    x = x_NHWC.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(x.reshape(n, (h // p) * (w // p), p * p * c))


def from_patches(values_NLP: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The inverse of `to_patches`: patches [N, L, P] -> images [N, H, W, C]."""
    p, c = geometry.patch, geometry.channels
    rows, cols = geometry.grid
    x = values_NLP.reshape(len(values_NLP), rows, cols, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(x.reshape(len(values_NLP), rows * p, cols * p, c))


def _image_shape(source: Source, where: str, height: int, width: int, channels: int, options: ImageEncoding) -> None:
    """Sets the source's kind, L, V or P and geometry for images of this size."""
    if options.encoding == "tokens":
        if channels != 1:
            raise DatasetError(
                f"{where}: quantised tokens are grayscale; set source.mode=L, or use source.encoding=patches for colour"
            )
        source.kind, source.vocab_size, source.length = "discrete", options.levels, height * width
        source.geometry = Geometry(height=height, width=width, channels=1, patch=1)
        return
    p = options.patch
    if height % p or width % p:
        raise DatasetError(f"{where}: images are {height}x{width}, not a multiple of source.patch={p}; change the patch")
    source.kind, source.patch_dim, source.length = "continuous", p * p * channels, (height // p) * (width // p)
    source.geometry = Geometry(height=height, width=width, channels=channels, patch=p)


# IDX: a 4-byte magic (0, 0, element type, number of dimensions), big-endian int32 sizes, data.
IDX_UBYTE = 0x08


def read_idx_header(path: Path, ndim: int) -> tuple[tuple[int, ...], int]:
    """(shape, data offset) of an uncompressed IDX file of unsigned bytes with `ndim` dimensions."""
    with open(path, "rb") as stream:
        magic = stream.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] != IDX_UBYTE or magic[3] != ndim:
            expected = f"00 00 08 {ndim:02x}"
            raise DatasetError(
                f"{path} is not an IDX file of {ndim}-D unsigned bytes: its magic number is {magic.hex(' ') or 'empty'}, "
                f"expected {expected} (as in train-{'images-idx3' if ndim == 3 else 'labels-idx1'}-ubyte)"
            )
        sizes = stream.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise DatasetError(f"{path}: the IDX header is truncated")
    shape = tuple(int(v) for v in np.frombuffer(sizes, dtype=">i4"))
    offset = 4 + 4 * ndim
    expected_bytes = offset + int(np.prod(shape))
    actual = path.stat().st_size
    if actual != expected_bytes:
        raise DatasetError(
            f"{path}: the header declares shape {shape} ({expected_bytes} bytes) but the file has {actual} bytes "
            "(truncated or not an IDX file)"
        )
    return shape, offset


class IdxSource(Source):
    def __init__(self, cfg: IdxInput, scratch: Path):
        self.cfg = cfg
        self.images_path = _uncompressed(Path(cfg.images), scratch)
        shape, self.images_offset = read_idx_header(self.images_path, 3)
        self.count, height, width = shape
        self.labels_path = self.labels_offset = None
        if cfg.labels:
            self.labels_path = _uncompressed(Path(cfg.labels), scratch)
            (label_count,), self.labels_offset = read_idx_header(self.labels_path, 1)
            if label_count != self.count:
                raise DatasetError(f"{cfg.labels} holds {label_count} labels for {self.count} images in {cfg.images}")
        self.name = Path(cfg.images).name.split(".")[0]
        _image_shape(self, cfg.images, height, width, 1, cfg)

    def __len__(self) -> int:
        return self.count

    def rows(self, indices_N: np.ndarray) -> dict[str, np.ndarray]:
        images = np.memmap(self.images_path, np.uint8, "r", self.images_offset).reshape(self.count, -1)
        assert self.geometry is not None  # set by _image_shape
        h, w = self.geometry.height, self.geometry.width
        out = {"values": encode_images(np.asarray(images[indices_N]).reshape(-1, h, w, 1), self.cfg)}
        if self.labels_path:
            assert self.labels_offset is not None  # read with the labels' path
            labels = np.memmap(self.labels_path, np.uint8, "r", self.labels_offset)
            out["label"] = np.asarray(labels[indices_N]).astype(np.int16)
        return out

    def identity(self) -> dict:
        return {"config": self.cfg.model_dump(), "files": _file_ids([Path(self.cfg.images), *([Path(self.cfg.labels)] if self.cfg.labels else [])])}


def _uncompressed(path: Path, scratch: Path) -> Path:
    """The file itself, or for .gz a decompressed copy in `scratch` (so it can be memory-mapped)."""
    if not path.is_file():
        raise DatasetError(f"{path} does not exist")
    if path.suffix != ".gz":
        return path
    target = scratch / path.stem
    try:
        with gzip.open(path, "rb") as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path} is not a readable gzip file: {exc}") from None
    return target


class ImageFolderSource(Source):
    def __init__(self, cfg: ImageFolderInput):
        from PIL import Image, UnidentifiedImageError

        self.cfg = cfg
        root = Path(cfg.folder)
        if not root.is_dir():
            raise DatasetError(f"image folder {root} does not exist")
        self.files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise DatasetError(f"no PNG or JPEG images under {root}; check source.folder")
        sizes, modes = {}, {}
        for name in self.files:
            try:
                with Image.open(root / name) as image:
                    sizes.setdefault(image.size, name)
                    modes.setdefault(image.mode, name)
            except (UnidentifiedImageError, OSError) as exc:
                raise DatasetError(f"{root / name} is not a readable image: {exc}") from None
        if cfg.resolution is None and len(sizes) > 1:
            shown = ", ".join(f"{w}x{h} (e.g. {name})" for (w, h), name in list(sizes.items())[:4])
            raise DatasetError(f"images under {root} have mixed sizes: {shown}; set source.resolution to resize and crop them")
        mode = cfg.mode
        if mode is None:
            if len(modes) > 1 or not set(modes) <= {"L", "RGB"}:
                shown = ", ".join(f"{m} (e.g. {name})" for m, name in modes.items())
                raise DatasetError(f"images under {root} have mode(s) {shown}; set source.mode=RGB or source.mode=L to convert them")
            mode = next(iter(modes))
        self.image_mode = mode
        width, height = (cfg.resolution, cfg.resolution) if cfg.resolution else next(iter(sizes))
        self.name = root.name
        _image_shape(self, str(root), height, width, 1 if mode == "L" else 3, cfg)
        self.attribute_names, self.attributes = (
            read_attributes(Path(cfg.attributes), self.files) if cfg.attributes else ([], None)
        )

    def __len__(self) -> int:
        return len(self.files)

    def rows(self, indices_N: np.ndarray) -> dict[str, np.ndarray]:
        from PIL import Image, ImageOps

        root, side = Path(self.cfg.folder), self.cfg.resolution
        pixels = []
        for index in indices_N:
            with Image.open(root / self.files[index]) as image:
                image = image.convert(self.image_mode)
                if side:
                    image = ImageOps.fit(image, (side, side), Image.Resampling.BICUBIC)
                pixels.append(np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, -1))
        out = {"values": encode_images(np.stack(pixels), self.cfg)}
        for column, name in enumerate(self.attribute_names):
            assert self.attributes is not None  # read with the names
            out[name] = self.attributes[indices_N, column]
        return out

    def identity(self) -> dict:
        root = Path(self.cfg.folder)
        files = _file_ids([root / name for name in self.files], root)
        attributes = _file_ids([Path(self.cfg.attributes)]) if self.cfg.attributes else None
        return {"config": self.cfg.model_dump(), "files": files, "attributes": attributes}


def read_attributes(path: Path, files: list[str]) -> tuple[list[str], np.ndarray]:
    """(names, int8 [N, A]) for `files` from a CSV (header row, first column the file name) or
    CelebA's list_attr_celeba.txt (a count line, a names line, then `file v1 v2 ...`). Files are
    matched by relative path or by base name."""
    if not path.is_file():
        raise DatasetError(f"attribute file {path} does not exist")
    lines = path.read_text().splitlines()
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(lines))
        if not rows:
            raise DatasetError(f"{path} is empty")
        names, records, first_line = rows[0][1:], rows[1:], 2
    else:
        if len(lines) < 2 or not lines[0].strip().isdigit():
            raise DatasetError(f"{path} is neither a CSV nor in CelebA's layout (a count line, then attribute names)")
        names, records, first_line = lines[1].split(), [line.split() for line in lines[2:] if line.strip()], 3
    reserved = {"values", "label"} & set(names)
    if reserved:
        raise DatasetError(f"{path}: attribute name(s) {sorted(reserved)} clash with dataset columns; rename them")
    table = {}
    for number, record in enumerate(records, first_line):
        if len(record) != len(names) + 1:
            raise DatasetError(f"{path} line {number}: {len(record) - 1} values for {len(names)} attributes")
        try:
            table[record[0]] = [int(v) for v in record[1:]]
        except ValueError:
            raise DatasetError(f"{path} line {number}: attribute values must be integers (e.g. -1/1)") from None
    matrix, missing = [], []
    for name in files:
        values = table.get(name, table.get(Path(name).name))
        if values is None:
            missing.append(name)
            values = [0] * len(names)
        matrix.append(values)
    if missing:
        raise DatasetError(f"{path} has no attributes for {len(missing)} image(s), e.g. {missing[:3]}; add them or remove the images")
    array = np.asarray(matrix, dtype=np.int64)
    if array.size and (array.min() < -128 or array.max() > 127):
        raise DatasetError(f"{path}: attribute values must fit in -128..127")
    return names, array.astype(np.int8)


class TextSource(Source):
    vocab_size = 256

    def __init__(self, cfg: TextInput):
        self.cfg = cfg
        root = Path(cfg.files)
        if root.is_file():
            paths = [root]
        elif root.is_dir():
            paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            raise DatasetError(f"text input {root} does not exist")
        if not paths:
            raise DatasetError(f"no files under {root}; check source.files")
        self.length, self.stride = cfg.length, cfg.stride or cfg.length
        self.paths = [str(p) for p in paths]
        for path in paths:
            check_utf8(path)
        sizes = np.array([p.stat().st_size for p in paths], dtype=np.int64)
        windows = np.where(sizes >= self.length, (sizes - self.length) // self.stride + 1, 0)
        if windows.sum() == 0:
            raise DatasetError(f"no file under {root} has {self.length} bytes (source.length); lower the length")
        self.starts = np.concatenate([[0], np.cumsum(windows)])  # window numbers where each file begins
        self.name = root.stem

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, indices_N: np.ndarray) -> dict[str, np.ndarray]:
        files = np.searchsorted(self.starts, indices_N, side="right") - 1
        values = np.empty((len(indices_N), self.length), dtype=np.uint8)
        for file in np.unique(files):
            data = np.memmap(self.paths[file], np.uint8, "r")
            for row in np.flatnonzero(files == file):
                offset = (indices_N[row] - self.starts[file]) * self.stride
                values[row] = data[offset : offset + self.length]
        return {"values": values}

    def identity(self) -> dict:
        return {"config": self.cfg.model_dump(), "files": _file_ids([Path(p) for p in self.paths])}


class TableSource(Source):
    """A table held in memory, one position per column (biglearn/data/table.py): {column: values}
    (floats with NaN for numeric columns, objects with None for the others) of `kinds`. Rows
    with no value are left out: they carry nothing to learn or to condition on."""

    def __init__(self, name: str, values: dict[str, np.ndarray], kinds: dict[str, str], bins: int, identity: dict):
        observed = np.zeros(len(next(iter(values.values()))), dtype=bool)
        for column, cells in values.items():
            observed |= ~np.isnan(cells) if kinds[column] == "numeric" else np.array([v is not None for v in cells], bool)
        self.values = {column: cells[observed] for column, cells in values.items()}
        if not observed.all():
            logging.getLogger("biglearn").info(f"[biglearn] {name}: {int((~observed).sum())} row(s) with no value left out")
        self.name, self.kinds, self.bins, self._identity = name, kinds, bins, identity
        self.length = len(values)
        if not len(self):
            raise DatasetError(f"table {name!r} has no row with a value")

    def fit(self, train_rows: np.ndarray) -> None:
        self.table = fit_schema(self.values, self.kinds, train_rows, self.bins)
        self.vocab_size = self.table.vocab_size

    def __len__(self) -> int:
        return len(next(iter(self.values.values())))

    def rows(self, indices_N: np.ndarray) -> dict[str, np.ndarray]:
        assert self.table is not None  # fitted before the rows are read
        return {"values": encode(self.table, {name: values[indices_N] for name, values in self.values.items()})}

    def identity(self) -> dict:
        return self._identity


def table_source(cfg: TableInput) -> TableSource:
    """The table `cfg` names, read whole into memory."""
    import pyarrow as pa

    from biglearn.data.storage import list_files

    files = table_files(cfg.files)
    parts = [_read_table(uri, cfg.missing) for uri in files]
    names = parts[0].column_names
    for uri, part in zip(files[1:], parts[1:]):
        if part.column_names != names:
            raise DatasetError(f"{uri} has columns {part.column_names}, {files[0]} has {names}: "
                               "a table's files must share their columns")
    unknown = [name for name in [*(cfg.columns or []), *cfg.categorical] if name not in names]
    if unknown:
        raise DatasetError(f"column(s) {unknown} not in {cfg.files}; it has {names}")
    values, kinds = arrow_columns(pa.concat_tables(parts, promote_options="permissive"), cfg.columns or names,
                                  cfg.categorical, cfg.missing)
    sizes = []
    for uri in files:
        folder, file = uri.rsplit("/", 1) if "/" in uri else (".", uri)
        sizes.append((file, list_files(folder).get(file)))
    name = Path(cfg.files.rstrip("/").rsplit("/", 1)[-1]).stem.replace("*", "") or "table"
    return TableSource(name, values, kinds, cfg.bins, {"config": cfg.model_dump(), "files": sizes})


def arrow_columns(table, chosen: list[str], categorical: list[str], missing: list[str]) -> tuple[dict, dict]:
    """({column: values}, {column: kind}) of an Arrow table's `chosen` columns: booleans are
    boolean, numbers numeric (unless listed in `categorical`), anything else categorical; text
    cells in `missing` are missing."""
    import pyarrow as pa

    values, kinds, markers = {}, {}, set(missing)
    for name in chosen:
        column = table.column(name)
        if pa.types.is_boolean(column.type):
            kinds[name] = "boolean"
        elif (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)) and name not in categorical:
            kinds[name] = "numeric"
        else:
            kinds[name] = "categorical"
        if kinds[name] == "numeric":
            values[name] = column.cast(pa.float64()).to_numpy()
        else:
            cells = column.to_pylist()
            values[name] = np.array([None if isinstance(v, str) and v.strip() in markers else v for v in cells], dtype=object)
    return values, kinds


TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


def table_files(spec: str) -> list[str]:
    """The files `spec` names: a file, a folder (its .csv/.tsv/.parquet files) or a glob."""
    from biglearn.data.storage import is_s3, list_files

    if is_s3(spec):
        found = list_files(spec)
        if found:
            return sorted(f"{spec.rstrip('/')}/{name}" for name in found if name.endswith(TABLE_SUFFIXES))
        folder, name = spec.rsplit("/", 1)
        if name in list_files(folder):
            return [spec]
        raise DatasetError(f"no table at {spec}: check source.files")
    path = Path(spec)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in TABLE_SUFFIXES)
    else:
        files = sorted(glob.glob(spec))
    if not files:
        raise DatasetError(f"no .csv, .tsv or .parquet file at {spec}: check source.files")
    return files


def _read_table(uri: str, missing: list[str]):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from biglearn.data.storage import resolve

    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as stream:
            if uri.lower().endswith(".parquet"):
                return pq.read_table(stream)
            delimiter = "\t" if uri.lower().endswith(".tsv") else ","
            return pcsv.read_csv(
                stream,
                parse_options=pcsv.ParseOptions(delimiter=delimiter),
                convert_options=pcsv.ConvertOptions(null_values=missing, strings_can_be_null=True),
            )
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"cannot read the table {uri}: {str(exc).strip().splitlines()[0]}") from None


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path} is not UTF-8: invalid byte at offset {offset + exc.start}") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not UTF-8: it ends inside a multi-byte character") from None


def gmm_modes(mixture: str) -> tuple[np.ndarray, float]:
    """(means [K, 2], per-coordinate variance) of the paper's mixtures (paper Sections 3.3 and 4.1;
    docs/method.md section 6)."""
    return paper_modes(mixture)  # one definition, shared with the simulations


class GmmSource(Source):
    """Samples of an equal-weight Gaussian mixture in 2-D: L = 2 coordinates, P = 1."""

    kind, length, patch_dim = "continuous", 2, 1

    def __init__(self, cfg: GmmInput):
        self.cfg, self.name = cfg, cfg.mixture
        self.means, self.variance = gmm_modes(cfg.mixture)

    def __len__(self) -> int:
        return self.cfg.num_examples

    def rows(self, indices_N: np.ndarray) -> dict[str, np.ndarray]:
        # Seeded by the rows asked for, so a shard converted again is the same shard.
        rng = np.random.default_rng([self.cfg.seed, int(indices_N[0]), len(indices_N)])
        component = rng.integers(0, len(self.means), len(indices_N))
        x = self.means[component] + np.sqrt(self.variance) * rng.standard_normal((len(indices_N), 2))
        return {"values": x.astype(np.float32)[:, :, None], "label": component.astype(np.int16)}

    def identity(self) -> dict:
        return {"config": self.cfg.model_dump()}


def digits_source(encoding: Literal["tokens", "patches"] = "tokens", patch: int = 2) -> ArraySource:
    """The embedded digits: tokens 0..16, or continuous patches of 0..16 / 16 (in [0, 1], the
    scale the BigLearn-GAN recipes use; other images are scaled to [-1, 1])."""
    from sklearn.datasets import load_digits
    from sklearn.utils import Bunch

    digits = cast(Bunch, load_digits())  # not the (X, y) of return_X_y, which the annotation allows
    labels = digits.target.astype(np.int16)
    if encoding == "tokens":
        return ArraySource("digits", {"values": digits.data.astype(np.int16), "label": labels}, vocab_size=17,
                           geometry=Geometry(height=8, width=8))
    if 8 % patch:
        raise DatasetError(f"the digits are 8x8: source.patch must divide 8, got {patch}")
    pixels = (digits.data.astype(np.float32) / 16).reshape(-1, 8, 8, 1)
    return ArraySource("digits", {"values": to_patches(pixels, patch), "label": labels}, kind="continuous",
                       patch_dim=patch * patch, geometry=Geometry(height=8, width=8, patch=patch))


@contextlib.contextmanager
def open_source(cfg: SourceInput) -> Iterator[Source]:
    """The source for `cfg`, its input checked; scratch files (decompressed IDX) live until exit."""
    with tempfile.TemporaryDirectory(prefix="biglearn-prepare-") as scratch:
        if isinstance(cfg, IdxInput):
            yield IdxSource(cfg, Path(scratch))
        elif isinstance(cfg, ImageFolderInput):
            yield ImageFolderSource(cfg)
        elif isinstance(cfg, TextInput):
            yield TextSource(cfg)
        elif isinstance(cfg, GmmInput):
            yield GmmSource(cfg)
        elif isinstance(cfg, TableInput):
            yield table_source(cfg)
        else:
            yield digits_source(cfg.encoding, cfg.patch)


def _file_ids(paths: list[Path], root: Path | None = None) -> str:
    """A digest of file names and sizes: cheap, and changes when the input set changes."""
    digest = hashlib.sha256()
    for path in paths:
        name = str(path.relative_to(root)) if root else path.name
        digest.update(f"{name}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()
