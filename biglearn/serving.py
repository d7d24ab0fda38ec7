"""Serving without the server: the request schema, its checks, and one batched model call.

A request names the known values (S), the target set (T, or "rest") and how to decode; it becomes
one (values, roles_L) task repeated `num_samples` times. Tasks from different callers share a
batch: roles are per row, and every row draws its noise from its own generator (seeded from the
request's seed), so a request's answer does not depend on who else is in the batch (a
generator's numbers only up to float rounding, ~1e-6: batch shapes change the kernels' sums).

Token models (an ML export) decode targets in `steps` rounds; generators (a BigLearn-GAN export:
continuous patches) draw every target in one pass with per-position noise, so the decoding
fields do not apply to them. A known value is a token id, or for a generator a patch of P numbers
(a plain number when P = 1).

Table models (trained on a table: one position per column) speak column names: known values are
{column: number | text | true/false}, targets are column names, and each sample comes back as
typed values by column name (numbers drawn within their bins), with a point estimate over the
samples (mean or most frequent value).

Token image models (a 1-channel pixel grid, patch 1) also take and return PNGs: value v is the
grey level round(255 * v / (V - 1)), read back with the inverse rounding.

Legend: B = rows in a batch, L = positions, P = patch dimension, H/W = image height/width.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveInt,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from biglearn.config import Config
from biglearn.data.table import MISSING, TableColumn, TableSchema, decode, encode, point_estimate
from biglearn.export import load_export
from biglearn.gan import generate
from biglearn.generation import MAX_GUIDANCE, Order, complete
from biglearn.model import ModelSpec
from biglearn.roles import ABSENT, SOURCE, TARGET

# --- configuration -------------------------------------------------------------------------


class LimitsConfig(Config):
    max_body_bytes: PositiveInt = 1_000_000
    """Largest request body accepted, in bytes."""
    max_num_samples: PositiveInt = 16
    """Most samples one request may ask for."""
    max_steps: PositiveInt = 256
    """Most decoding steps one request may ask for."""
    max_length: PositiveInt = 16_384
    """Longest sequence (positions) of a model the server loads; a longer export is refused."""
    max_tokens_per_request: PositiveInt = 65_536
    """Most num_samples x length (x2 with guidance) a request may ask for: bounds its work."""


class BatchingConfig(Config):
    """Rows, not requests: a request of n samples takes n rows of a batch."""

    enabled: bool = True
    """Batch concurrent requests into shared model calls; off: each runs alone."""
    max_batch_rows: PositiveInt = 64
    """Most rows (samples) in one batched model call; at least limits.max_num_samples."""
    batch_wait_timeout_s: NonNegativeFloat = 0.01
    """Seconds a request may wait for others to share its model call (counted from its arrival)."""


class DecodingConfig(Config):
    """What a request gets for the decoding fields it leaves out."""

    steps: PositiveInt = 16
    """Decoding steps: the targets are committed in this many rounds."""
    order: Order = "random"
    """Which targets each step commits: random ones, or the most confident first. Confidence order
    collapses joint samples (docs/results.md)."""
    temperature: NonNegativeFloat = 1.0
    """Sampling temperature; 0 takes the most likely value."""
    top_k: PositiveInt | None = None
    """Sample only among the k most likely values; null: among all."""
    guidance: float = Field(default=0.0, ge=0, le=MAX_GUIDANCE)
    """Guidance weight w (biglearn/generation.py); 0: plain sampling."""


class ServingConfig(Config):
    limits: LimitsConfig = LimitsConfig()
    batching: BatchingConfig = BatchingConfig()
    decoding: DecodingConfig = DecodingConfig()
    torch_threads: PositiveInt | None = None
    """CPU threads each replica's torch uses; null: torch's default."""

    @model_validator(mode="after")
    def _check(self) -> ServingConfig:
        if self.batching.max_batch_rows < self.limits.max_num_samples:
            raise ValueError(
                f"batching.max_batch_rows ({self.batching.max_batch_rows}) must be >= limits.max_num_samples "
                f"({self.limits.max_num_samples}): one request's samples share a batch"
            )
        if self.decoding.steps > self.limits.max_steps:
            raise ValueError(
                f"decoding.steps ({self.decoding.steps}) exceeds limits.max_steps ({self.limits.max_steps})"
            )
        return self


# --- the model and what it is ----------------------------------------------------------------


class ColumnCard(BaseModel):
    """A table model's column: what a request may give for it and what comes back."""

    name: str
    type: Literal["numeric", "categorical", "boolean"]
    categories: list[str] | None = Field(default=None, description="categorical: the values it takes")
    minimum: float | None = Field(
        default=None, description="numeric: the smallest training value (smaller ones count as it)"
    )
    maximum: float | None = Field(
        default=None, description="numeric: the largest training value (larger ones count as it)"
    )
    integer: bool = Field(default=False, description="numeric: values are whole numbers")


def column_card(column: TableColumn) -> ColumnCard:
    if column.type == "numeric":
        assert column.edges is not None  # every numeric column has its bin edges (TableColumn)
        return ColumnCard(
            name=column.name, type="numeric", minimum=column.edges[0], maximum=column.edges[-1], integer=column.integer
        )
    return ColumnCard(
        name=column.name, type=column.type, categories=column.categories if column.type == "categorical" else None
    )


class ModelCard(BaseModel):
    """GET /v1/model."""

    dataset: str
    kind: Literal["discrete", "continuous"]
    length: int
    vocab_size: int | None
    patch_dim: int | None = None
    geometry: dict[str, int] | None
    png: bool = Field(description="whether /v1/complete takes and returns PNG images for this model")
    panel: dict[str, Any] | None = Field(description="panel scores from training (panel.json), if evaluated")
    config_sha256: str = Field(description="sha256 of the training config (canonical JSON)")
    architecture: dict[str, Any]
    carries_training_data: bool = Field(
        description="the weights hold training examples (a retrieval memory): sharing the export shares them"
    )
    columns: list[ColumnCard] | None = Field(
        default=None, description="a table model's columns, in position order: requests name them in values and target"
    )


class ExportedModel:
    """A loaded export: the model in eval mode, its spec and its card."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", max_length: int | None = None):
        folder = Path(folder)
        self.model, self.spec = load_export(folder, device)
        if max_length is not None and self.spec.length > max_length:
            raise ValueError(
                f"the export's sequence length {self.spec.length} exceeds limits.max_length ({max_length})"
            )
        self.device = torch.device(device)
        manifest = _read_json(folder / "manifest.json")
        config = _read_json(folder / "config.json")
        panel_path = folder / "panel.json"
        geometry = manifest.get("geometry")
        self.table = TableSchema.model_validate(manifest["table"]) if manifest.get("table") else None
        self.card = ModelCard(
            dataset=manifest.get("name", "unknown"),
            kind=manifest.get("kind", "discrete"),
            length=self.spec.length,
            vocab_size=self.spec.vocab_size,
            patch_dim=manifest.get("patch_dim"),
            geometry=geometry,
            png=_png_shape(self.spec, geometry) is not None,
            panel=_read_json(panel_path) if panel_path.is_file() else None,
            config_sha256=hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            architecture=self.spec.model.model_dump(),
            carries_training_data=self.spec.carries_training_data,
            columns=[column_card(column) for column in self.table.columns] if self.table else None,
        )
        self.image_shape = _png_shape(self.spec, geometry)
        self.vocab_size = self.spec.vocab_size or 0
        """V of a token model; 0 for a generator (its values are patches)."""
        self.problem = self._probe()

    @torch.no_grad()
    def _probe(self) -> str | None:
        """Why this model cannot serve (non-finite outputs on an all-target row), or None."""
        spec = self.spec
        roles_BL = torch.full((1, spec.length), TARGET, dtype=torch.int8, device=self.device)
        if spec.continuous:
            values_BLP = torch.zeros(1, spec.length, spec.patch_dim or 1, device=self.device)
            out = self.model(values_BLP, roles_BL, torch.zeros(1, spec.length, spec.noise_dim, device=self.device))
        else:
            out = self.model(torch.zeros_like(roles_BL, dtype=torch.long), roles_BL)
        if torch.isfinite(out).all():
            return None
        return "the model's outputs are not finite: the export's weights are broken; serve another export"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def _png_shape(spec: ModelSpec, geometry: dict | None) -> tuple[int, int] | None:
    """(H, W) when positions are the pixels of a 1-channel image in row-major order."""
    if spec.continuous or not geometry or geometry.get("channels", 1) != 1 or geometry.get("patch", 1) != 1:
        return None
    height, width = geometry["height"], geometry["width"]
    return (height, width) if height * width == spec.length and (spec.vocab_size or 0) <= 256 else None


# --- requests -------------------------------------------------------------------------------


class RequestError(ValueError):
    """A request the model cannot answer as asked; the message says what to change."""


class ImageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    png: str = Field(description="base64 PNG, greyscale, the model's height x width")
    mask: str | None = Field(
        default=None, description="base64 PNG of the same size: white (>= 128) = known pixel; default: all known"
    )


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeNumber = Annotated[int, BeforeValidator(_whole), Strict()]
"""An integer as JSON Schema has it: 2 and 2.0 are the same number; "2" and true are not numbers."""
FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]
KnownValue = StrictInt | FiniteFloat | list[FiniteFloat]
"""A token id, or (generators) a patch of P numbers, a plain number when P = 1."""
Cell = StrictBool | StrictInt | FiniteFloat | StrictStr
"""A table cell: a number (numeric column), a category's text, or true/false (boolean column)."""
MAX_SEED = 2**53 - 1
"""The largest seed: every JSON client holds integers up to 2^53 - 1 exactly."""


class CompleteRequest(BaseModel):
    """POST /v1/complete. Known values either as `values` or (image models) as `image`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"values": {"0": 3, "1": 0}, "target": "rest", "num_samples": 2, "seed": 7}]},
    )

    values: list[KnownValue | None] | dict[int | str, KnownValue | Cell | None] | None = Field(
        default=None,
        description="known values: a full-length list or {position: value}, null for unknown; "
        "a value is a token id, or for a continuous model a patch of P numbers (a number when P = 1); "
        "a table model takes {column: value} (null = unknown)",
    )
    image: ImageInput | None = None
    target: Literal["rest"] | list[WholeNumber] | list[StrictStr] = Field(
        default="rest",
        description='positions (a table model: column names) to generate, or "rest" = every one not known',
    )
    num_samples: WholeNumber = Field(default=1, gt=0)
    seed: WholeNumber = Field(default=0, ge=0, le=MAX_SEED)
    temperature: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, strict=True, description="0 takes the most likely value"
    )
    top_k: WholeNumber | None = Field(default=None, gt=0)
    steps: WholeNumber | None = Field(default=None, gt=0)
    order: Order | None = None
    guidance: float | None = Field(
        default=None,
        ge=0,
        le=MAX_GUIDANCE,
        allow_inf_nan=False,
        strict=True,
        description="w > 0 sharpens the samples toward the known values: each step samples from "
        "p(x | known) * (p(x | known) / p(x))^w, the same model asked again without the known values",
    )
    return_png: StrictBool = False

    @field_validator("values", mode="before")
    @classmethod
    def _positions_written_plainly(cls, values: Any) -> Any:
        """A position is written as a whole number without leading zeros ("7", not "07"), so
        that no two keys name the same position."""
        if isinstance(values, dict):
            padded = [key for key in values if isinstance(key, str) and key.isdigit() and key != str(int(key))]
            if padded:
                raise ValueError(
                    f"values: write positions without leading zeros ({padded[0]!r} -> {str(int(padded[0]))!r})"
                )
        return values


class Sample(BaseModel):
    values: list[int | None] | list[float | None] | list[list[float] | None] | dict[str, Cell] = Field(
        description="per position: token ids, or for a continuous model one number (P = 1) or patch; "
        "null where a position was neither given nor a target; "
        "a table model: {column: value} for the given and target columns"
    )
    png: str | None = None


class CompleteResponse(BaseModel):
    """The decoding settings used; generators (one pass, no decoding) leave them out."""

    samples: list[Sample]
    estimate: dict[str, Cell | None] | None = Field(
        default=None,
        description="a table model: per target column the mean (numeric) or most frequent value over the samples",
    )
    seed: int
    steps: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    order: Order | None = None
    guidance: float | None = None


@dataclass(frozen=True)
class Decoding:
    steps: int
    order: Order
    temperature: float
    top_k: int | None
    guidance: float


@dataclass(frozen=True)
class Task:
    """One request, checked: its rows are `values`/`roles_L` repeated `num_samples` times."""

    values: torch.Tensor
    """values_L (int64 token ids), or values_LP (float32 patches) for a generator."""
    roles_L: torch.Tensor
    num_samples: int
    seed: int
    decoding: Decoding | None
    """None for a generator: it draws in one pass."""
    return_png: bool
    given: dict[str, Any] | None = None
    """A table model's known cells as the request gave them (they come back unchanged)."""

    @property
    def num_targets(self) -> int:
        return int((self.roles_L == TARGET).sum())


def parse_request(request: CompleteRequest, served: ExportedModel, cfg: ServingConfig) -> Task:
    """Checks a request against the model and the limits; raises RequestError saying what to fix."""
    spec, limits = served.spec, cfg.limits
    length = spec.length
    if request.num_samples > limits.max_num_samples:
        raise RequestError(f"num_samples is {request.num_samples}; this server allows at most {limits.max_num_samples}")
    decoding = None
    if spec.continuous:
        _no_decoding(request)
    else:
        decoding = Decoding(
            steps=request.steps or cfg.decoding.steps,
            order=request.order or cfg.decoding.order,
            temperature=cfg.decoding.temperature if request.temperature is None else request.temperature,
            top_k=request.top_k if request.top_k is not None else cfg.decoding.top_k,
            guidance=cfg.decoding.guidance if request.guidance is None else request.guidance,
        )
        if decoding.steps > limits.max_steps:
            raise RequestError(f"steps is {decoding.steps}; this server allows at most {limits.max_steps}")
    # Guidance decodes every row twice (with and without the given values), so it counts twice.
    passes = 2 if decoding is not None and decoding.guidance > 0 else 1
    if request.num_samples * length * passes > limits.max_tokens_per_request:
        work = (
            f"num_samples * length{' * 2 (guidance)' if passes == 2 else ''} = {request.num_samples * length * passes}"
        )
        raise RequestError(f"{work} exceeds {limits.max_tokens_per_request}; ask for fewer samples")
    if request.return_png and served.image_shape is None:
        raise RequestError("return_png: this model's positions are not the pixels of an image; leave it false")

    if served.table is not None:
        values, known_L, target_L, given = _table_cells(request, served.table)
    else:
        values, known_L = _known_values(request, served)
        target_L = _target_positions(request.target, known_L)
        given = None

    roles_L = torch.full((length,), ABSENT, dtype=torch.int8)
    roles_L[known_L] = SOURCE
    roles_L[target_L] = TARGET
    known = known_L[:, None] if spec.continuous else known_L
    return Task(
        values=torch.where(known, values, 0),
        roles_L=roles_L,
        num_samples=request.num_samples,
        seed=request.seed,
        decoding=decoding,
        return_png=request.return_png,
        given=given,
    )


def _target_positions(target: Literal["rest"] | list[int] | list[str], known_L: torch.Tensor) -> torch.Tensor:
    """target_L from "rest" or a list of positions, less the known ones (they keep their values)."""
    length = len(known_L)
    if target == "rest":
        return ~known_L
    if not target:
        raise RequestError('target is empty: list at least one position, or use "rest"')
    if not all(isinstance(position, int) for position in target):
        raise RequestError("target lists column names, but this model is not a table: list positions (whole numbers)")
    positions = _positions([int(position) for position in target], length, "target")
    if len(set(positions)) != len(positions):
        raise RequestError("target lists a position more than once")
    target_L = torch.zeros(length, dtype=torch.bool)
    target_L[positions] = True
    return target_L & ~known_L


def _table_cells(request: CompleteRequest, table: TableSchema) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(values_L, known_L, target_L, given cells) of a table model's request by column name."""
    values_L, known_L, given = _table_values(request, table)
    target_L = ~known_L if request.target == "rest" else _target_columns(request.target, table) & ~known_L
    return values_L, known_L, target_L, given


def _table_values(request: CompleteRequest, table: TableSchema) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(values_L, known_L, given cells) of a table model's `values` by column name."""
    names = [column.name for column in table.columns]
    if request.image is not None or isinstance(request.values, list):
        field = "image" if request.image is not None else "values"
        raise RequestError(f"{field}: this model is a table; send values as {{column: value}} with columns {names}")
    named = {str(name): value for name, value in (request.values or {}).items()}
    unknown = [name for name in named if name not in names]
    if unknown:
        raise RequestError(
            f"values names column(s) {unknown[:10]} that this model does not have; its columns are {names}"
        )
    given = {name: value for name, value in named.items() if value is not None}
    cells = {column.name: _cell(column, given.get(column.name)) for column in table.columns}
    known_L = torch.tensor([name in given for name in names])
    values_L = torch.from_numpy(encode(table, cells)[0].astype(np.int64))
    return values_L, known_L, given


def _target_columns(target: list[int] | list[str], table: TableSchema) -> torch.Tensor:
    """target_L of a list of column names."""
    names = [column.name for column in table.columns]
    if not target:
        raise RequestError('target is empty: list at least one column, or use "rest"')
    if not all(isinstance(name, str) for name in target):
        raise RequestError(f"target: this model is a table; list column names (of {names}), not positions")
    unknown = [name for name in target if name not in names]
    if unknown:
        raise RequestError(
            f"target names column(s) {unknown[:10]} that this model does not have; its columns are {names}"
        )
    if len(set(target)) != len(target):
        raise RequestError("target lists a column more than once")
    return torch.tensor([name in target for name in names])


def parse_scoring(request: CompleteRequest, served: ExportedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(values_L, roles_L) to score log p(x_T | x_S): `request.values` holds the sources and the
    targets' values too, `request.target` lists the targets; raises RequestError saying what to fix."""
    if served.spec.continuous:
        raise RequestError("this model is a BigLearn-GAN generator: it draws samples but has no likelihood to score")
    if request.target == "rest":
        raise RequestError("target: list the positions (a table model: column names) whose given values are scored")
    if served.table is not None:
        values_L, known_L, _ = _table_values(request, served.table)
        target_L = _target_columns(request.target, served.table)
    else:
        values_L, known_L = _known_values(request, served)
        target_L = _target_positions(request.target, torch.zeros_like(known_L))
    if (target_L & ~known_L).any():
        missing = torch.nonzero(target_L & ~known_L)[:, 0].tolist()
        raise RequestError(f"positions {missing[:10]} are targets without a value: give the values to score")
    roles_L = torch.full(known_L.shape, ABSENT, dtype=torch.int8)
    roles_L[known_L] = SOURCE
    roles_L[target_L] = TARGET
    return torch.where(known_L, values_L, 0), roles_L


def _cell(column: TableColumn, value: Any) -> np.ndarray:
    """One cell as `encode` reads it (a 1-row column), checked against the column's type."""
    if value is None:
        return np.array([np.nan]) if column.type == "numeric" else np.array([None], dtype=object)
    where = f"values[{column.name!r}] = {json.dumps(value)}"
    if column.type == "numeric":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{where}: column {column.name!r} is numeric; send a number")
        return np.array([_finite(value, where)])
    if column.type == "boolean":
        if not isinstance(value, bool):
            raise RequestError(f"{where}: column {column.name!r} is boolean; send true or false")
        return np.array([value], dtype=object)
    value = _whole(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(f"{where}: column {column.name!r} is categorical; send one of its categories as text")
    categories = column.categories or []
    if str(value) not in categories:
        shown = ", ".join(categories[:20]) + (", ..." if len(categories) > 20 else "")
        raise RequestError(f"{where}: not a category of column {column.name!r}; it has {shown} (GET /v1/model)")
    return np.array([str(value)], dtype=object)


def _no_decoding(request: CompleteRequest) -> None:
    """Generators draw in one pass: a decoding field would be silently ignored, so it is refused."""
    fields = [field.name for field in dataclasses.fields(Decoding)]
    given = [name for name in fields if getattr(request, name) is not None]
    if given:
        raise RequestError(
            f"{', '.join(given)}: this model is a BigLearn-GAN generator, which draws every target in one "
            f"pass with noise; leave out {', '.join(fields)}"
        )


def _known_values(request: CompleteRequest, served: ExportedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, known_L): values_L int64 for a token model, values_LP float32 for a generator."""
    spec = served.spec
    if request.values is not None and request.image is not None:
        raise RequestError("give the known values either as `values` or as `image`, not both")
    if request.image is not None:
        if served.image_shape is None:
            raise RequestError("image: this model's positions are not the pixels of an image; send `values`")
        values_L = decode_png(request.image.png, served.image_shape, served.vocab_size, "image.png")
        if request.image.mask is None:
            return values_L, torch.ones(spec.length, dtype=torch.bool)
        mask_L = decode_png(request.image.mask, served.image_shape, 2, "image.mask")
        return values_L, mask_L.bool()
    if isinstance(request.values, list):
        if len(request.values) != spec.length:
            raise RequestError(
                f"values has {len(request.values)} entries; this model takes exactly {spec.length} (null for unknown), "
                "or send a map {position: value}"
            )
        known = {position: value for position, value in enumerate(request.values) if value is not None}
    else:
        known = {}
        for key, value in (request.values or {}).items():
            if isinstance(key, str) and not key.isdigit():
                raise RequestError(
                    f"values names column {key!r}, but this model is not a table: send {{position: value}}"
                )
            if isinstance(value, (bool, str)):
                raise RequestError(f"values[{key}] = {json.dumps(value)} is neither a token id nor a number")
            known[int(key)] = value
        _positions(list(known), spec.length, "values")
        known = {position: value for position, value in known.items() if value is not None}  # null: unknown
    known_L = torch.zeros(spec.length, dtype=torch.bool)
    known_L[list(known)] = True
    if spec.continuous:
        assert spec.patch_dim is not None  # a generator's values are patches (ModelSpec)
        values_LP = torch.zeros(spec.length, spec.patch_dim)
        for position, value in known.items():
            values_LP[position] = torch.tensor(_patch(value, position, spec.patch_dim))
        return values_LP, known_L
    vocab_size = served.vocab_size
    values_L = torch.zeros(spec.length, dtype=torch.long)
    for position, value in known.items():
        value = _whole(value)
        if not isinstance(value, int):
            raise RequestError(
                f"values[{position}] = {value} is not a token id: this model takes whole numbers 0..{vocab_size - 1}"
            )
        if not 0 <= value < vocab_size:
            raise RequestError(f"values[{position}] = {value} is outside the vocabulary 0..{vocab_size - 1}")
        values_L[position] = value
    return values_L, known_L


def _patch(value: int | float | list[float], position: int, patch_dim: int) -> list[float]:
    patch = value if isinstance(value, list) else [value]
    if len(patch) != patch_dim:
        shape = "one number" if patch_dim == 1 else f"a list of {patch_dim} numbers (one patch)"
        raise RequestError(f"values[{position}] has {len(patch)} numbers; each known value of this model is {shape}")
    return [_finite(x, f"values[{position}]") for x in patch]


def _finite(number: float, where: str) -> float:
    """A JSON number as a float; an integer beyond the float range is refused."""
    try:
        return float(number)
    except OverflowError:
        raise RequestError(f"{where}: {number} is beyond the range of a float") from None


def _positions(positions: list[int], length: int, field: str) -> list[int]:
    outside = [p for p in positions if not 0 <= p < length]
    if outside:
        raise RequestError(f"{field}: positions {outside[:10]} are outside 0..{length - 1}")
    return positions


# --- PNG ------------------------------------------------------------------------------------


def grey_image(values_L: torch.Tensor | np.ndarray, shape: tuple[int, int], vocab_size: int) -> Image.Image:
    """The greyscale image of a row-major image of values 0..V-1."""
    top = max(vocab_size - 1, 1)
    values = values_L.cpu().numpy() if isinstance(values_L, torch.Tensor) else np.asarray(values_L)
    return Image.fromarray(np.rint(values.reshape(shape) * (255 / top)).astype(np.uint8), mode="L")


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_png(values_L: torch.Tensor, shape: tuple[int, int], vocab_size: int) -> str:
    """Base64 greyscale PNG of a row-major image of values 0..V-1."""
    return png_base64(grey_image(values_L, shape, vocab_size))


def decode_png(data: str, shape: tuple[int, int], vocab_size: int, field: str) -> torch.Tensor:
    """The inverse of encode_png (colour images are converted to grey); values_L int64."""
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            if image.format != "PNG":
                raise RequestError(f"{field}: expected a PNG, got {image.format}")
            if image.size != (shape[1], shape[0]):
                raise RequestError(
                    f"{field}: image is {image.size[0]}x{image.size[1]} (WxH); this model takes {shape[1]}x{shape[0]}"
                )
            grey_HW = np.asarray(image.convert("L"), dtype=np.float64)
    except RequestError:
        raise
    except (ValueError, UnidentifiedImageError, OSError) as exc:  # binascii.Error is a ValueError
        raise RequestError(f"{field}: not a base64-encoded PNG ({exc})") from None
    top = max(vocab_size - 1, 1)
    return torch.from_numpy(np.rint(grey_HW * (top / 255)).astype(np.int64).reshape(-1))


# --- the batched call -------------------------------------------------------------------------


def sample_generators(seed: int, num_samples: int) -> list[torch.Generator]:
    """One generator per sample, all derived from the request's seed (sample i never equals
    sample 0 of the request with seed + i)."""
    seeds = torch.randint(0, 2**62, (num_samples,), generator=torch.Generator().manual_seed(seed))
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def complete_tasks(model: torch.nn.Module, tasks: list[Task], device: torch.device) -> list[torch.Tensor]:
    """Runs tasks from any callers together; returns each task's samples (CPU): values_NL (int64)
    from a token model, values_NLP (float32) from a generator.

    Rows with different (S, T) share one model call; token tasks with different decoding settings
    (steps, order, temperature, top-k, guidance) need separate calls, one per setting.
    """
    results: list[torch.Tensor] = [torch.empty(0)] * len(tasks)
    by_decoding: dict[Decoding | None, list[int]] = {}
    for index, task in enumerate(tasks):
        by_decoding.setdefault(task.decoding, []).append(index)
    for decoding, indices in by_decoding.items():
        group = [tasks[i] for i in indices]
        values_B = torch.cat([t.values.expand(t.num_samples, *t.values.shape) for t in group]).to(device)
        roles_BL = torch.cat([t.roles_L.expand(t.num_samples, -1) for t in group]).to(device)
        generators = [g for t in group for g in sample_generators(t.seed, t.num_samples)]
        if decoding is None:
            out_B = generate(model, values_B, roles_BL, generators)
        else:
            out_B = complete(model, values_B, roles_BL, generators, **dataclasses.asdict(decoding))
        for index, rows in zip(indices, out_B.cpu().split([t.num_samples for t in group])):
            results[index] = rows
    return results


def respond(task: Task, samples: torch.Tensor, served: ExportedModel) -> CompleteResponse:
    """`samples`: values_NL (token model) or values_NLP (generator; P = 1 is answered as numbers)."""
    if served.table is not None:
        return _table_response(task, samples, served.table)
    if served.spec.patch_dim == 1:
        samples = samples[..., 0]
    absent = (task.roles_L == ABSENT).tolist()
    answers = [
        Sample(
            values=[None if left_out else value for value, left_out in zip(row.tolist(), absent)],
            png=encode_png(row, served.image_shape, served.vocab_size)
            if task.return_png and served.image_shape
            else None,
        )
        for row in samples
    ]
    d = task.decoding
    if d is None:
        return CompleteResponse(samples=answers, seed=task.seed)
    return CompleteResponse(samples=answers, seed=task.seed, **dataclasses.asdict(d))


def _table_response(task: Task, samples_NL: torch.Tensor, table: TableSchema) -> CompleteResponse:
    """Samples as {column: value} for the given and target columns, numbers drawn within their
    bins (from the request's seed), and the point estimate of each target column over them."""
    tokens_NL = samples_NL.numpy().astype(np.int32)
    targets = [index for index in range(len(table.columns)) if task.roles_L[index] == TARGET]
    tokens_NL[:, [index for index in range(len(table.columns)) if index not in targets]] = MISSING
    drawn = decode(table, tokens_NL, np.random.default_rng(task.seed))
    estimate = point_estimate(
        table, [{name: cells[row : row + 1] for name, cells in drawn.items()} for row in range(len(tokens_NL))]
    )
    answers = []
    for row in range(len(tokens_NL)):
        cells = dict(task.given or {})
        for index in targets:
            column = table.columns[index]
            cells[column.name] = _typed(column, drawn[column.name][row])
        answers.append(Sample(values=cells))
    estimates = {
        table.columns[index].name: _typed(table.columns[index], estimate[table.columns[index].name][0], mean=True)
        for index in targets
    }
    assert task.decoding is not None  # a table model is a token model
    return CompleteResponse(samples=answers, estimate=estimates, seed=task.seed, **dataclasses.asdict(task.decoding))


def _typed(column: TableColumn, value: Any, mean: bool = False) -> bool | int | float | str | None:
    """A decoded cell as JSON: whole numbers for integer columns (not their means), true/false for booleans."""
    if value is None:
        return None
    if column.type == "numeric":
        return int(value) if column.integer and not mean else float(value)
    return bool(value) if column.type == "boolean" else str(value)
