"""Using a trained model from Python: `biglearn.load(export)` and its `complete` and `log_prob`.

    >>> model = biglearn.load("runs/digits-quick/export")            # doctest: +SKIP
    >>> out = model.complete({0: 0, 1: 5}, num_samples=4, seed=0)    # doctest: +SKIP
    >>> out.samples.shape                                             # doctest: +SKIP
    (4, 64)

Every call is a request to the code the server runs (biglearn.serving): the same checks, the same
decoding and the same answer for the same seed; only the server's size limits are lifted.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from biglearn.config import validate_config
from biglearn.generation import decoding_nll
from biglearn.roles import ABSENT, TARGET
from biglearn.serving import (
    CompleteRequest,
    CompleteResponse,
    ExportedModel,
    ModelCard,
    ServingConfig,
    complete_tasks,
    grey_image,
    parse_request,
    parse_scoring,
    png_base64,
    respond,
)

# A Python caller bounds its own work: only the server's request-size limits are lifted.
UNLIMITED = 2**31 - 1
IN_PROCESS = {
    "limits": {"max_num_samples": UNLIMITED, "max_tokens_per_request": UNLIMITED, "max_body_bytes": UNLIMITED},
    "batching": {"max_batch_rows": UNLIMITED},
}


@dataclass(frozen=True)
class Completion:
    """What `Model.complete` returns."""

    samples: np.ndarray | list[dict[str, Any]]
    """Token ids [num_samples, L] (-1 where a position was neither given nor a target); a
    BigLearn-GAN generator's values [num_samples, L] (P = 1) or [num_samples, L, P] (NaN there);
    a table model's rows as {column: value} (given and target columns)."""
    estimate: dict[str, Any] | None
    """A table model: per target column the mean (numeric) or most frequent value; else None."""
    images: list[Image.Image] | None
    """An image model's samples as greyscale PIL images; else None."""
    response: CompleteResponse
    """The answer as the HTTP endpoint gives it."""


class Model:
    """A loaded export. `biglearn.load` makes one."""

    def __init__(self, served: ExportedModel, settings: ServingConfig):
        self.served = served
        self.settings = settings

    @property
    def card(self) -> ModelCard:
        """What the model is (GET /v1/model): dataset, length, vocabulary, columns, ..."""
        return self.served.card

    def complete(
        self,
        values: Mapping[Any, Any] | Sequence[Any] | np.ndarray | Image.Image | None = None,
        target: str | Sequence[int] | Sequence[str] = "rest",
        *,
        mask: np.ndarray | Image.Image | None = None,
        num_samples: int = 1,
        seed: int = 0,
        **decoding: Any,
    ) -> Completion:
        """Draws `num_samples` completions of the targets given the known values.

        values: {position: value}, a full-length list with None for unknown, a numpy array with
        `mask` (True = known), or for an image model a PIL image (with `mask`: an image, white =
        known, or a boolean array); a table model takes {column: value}. target: "rest" (every
        position not known) or a list of positions (column names). decoding: steps, order,
        temperature, top_k, guidance (defaults: the serving config's).
        """
        request = CompleteRequest.model_validate(
            {
                **self._known(values, mask),
                "target": _plain(target),
                "num_samples": num_samples,
                "seed": seed,
                **decoding,
            }
        )
        task = parse_request(request, self.served, self.settings)
        (samples,) = complete_tasks(self.served.model, [task], self.served.device)
        response = respond(task, samples, self.served)
        if self.served.table is not None:
            rows: np.ndarray | list[dict[str, Any]] = [cast(dict, sample.values) for sample in response.samples]
        else:  # positions neither given nor target: -1 (token ids) or NaN (a generator's numbers)
            rows = samples.numpy().copy()
            rows[:, (task.roles_L == ABSENT).numpy()] = np.nan if self.served.spec.continuous else -1
            if self.served.spec.patch_dim == 1:
                rows = rows[..., 0]
        images = None
        if self.served.image_shape is not None:
            images = [grey_image(row, self.served.image_shape, self.served.vocab_size) for row in samples]
        return Completion(samples=rows, estimate=response.estimate, images=images, response=response)

    def log_prob(
        self,
        values: Mapping[Any, Any] | Sequence[Any] | np.ndarray,
        target: Sequence[int] | Sequence[str],
        *,
        mask: np.ndarray | None = None,
        steps: int | None = None,
        seed: int = 0,
    ) -> float:
        """log p(x_T | x_S) in nats of the targets' given values, the other given values as sources.

        `values` holds the sources and the targets; `target` lists the targets. The targets are
        revealed in a random order (from `seed`), `steps` chunks (default: one target a step, the
        chain rule along that order); steps=1 scores them all from one pass. The random-order
        sampler mixes over orders, so this is one order's log-likelihood, not the mixture's.
        """
        request = CompleteRequest.model_validate({**self._known(values, mask), "target": _plain(target)})
        values_L, roles_L = parse_scoring(request, self.served)
        targets = int((roles_L == TARGET).sum())
        device = self.served.device
        nll_B = decoding_nll(
            self.served.model,
            values_L[None].to(device),
            roles_L[None].to(device),
            torch.Generator(device=device).manual_seed(seed),
            steps=steps or targets,
        )
        return -float(nll_B[0])

    def _known(self, values: Any, mask: Any) -> dict[str, Any]:
        """The request fields (`values` or `image`) for the known values as a caller gives them."""
        if isinstance(values, Image.Image):
            image = {"png": png_base64(values)}
            if mask is not None:
                image["mask"] = png_base64(mask if isinstance(mask, Image.Image) else _mask_image(mask))
            return {"image": image}
        if isinstance(values, np.ndarray):
            if mask is None:
                raise ValueError("values is an array: give `mask` (True = known) of the same shape")
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != values.shape:
                raise ValueError(f"mask has shape {mask.shape}; values has {values.shape}")
            flat, known = values.reshape(-1), mask.reshape(-1)
            return {"values": {str(i): _plain(flat[i]) for i in np.flatnonzero(known)}}
        if mask is not None:
            raise ValueError("mask goes with values given as an array or an image")
        if values is None:
            return {"values": {}}  # nothing known: a joint sample
        if isinstance(values, Mapping):
            return {"values": {str(key): _plain(value) for key, value in values.items()}}
        return {"values": [_plain(value) for value in values]}


def load(
    export: str | Path, device: str | torch.device | None = None, settings: Mapping[str, Any] | None = None
) -> Model:
    """Loads an export (a folder, or an s3:// URI, which is copied to a temporary folder first).

    device: "cpu", "cuda", ... (default: a GPU when there is one). settings: ServingConfig keys
    (e.g. {"decoding": {"steps": 32}}); request sizes are not limited unless set here.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = validate_config(ServingConfig, _merged(IN_PROCESS, dict(settings or {})), "settings")
    if str(export).startswith("s3://"):
        from biglearn.data.storage import fetch_folder  # pyarrow's S3 client, only when asked for

        with tempfile.TemporaryDirectory(prefix="biglearn-export-") as folder:
            served = ExportedModel(fetch_folder(str(export), folder), device, config.limits.max_length)
    else:
        served = ExportedModel(Path(export), device, config.limits.max_length)
    if served.problem:
        raise ValueError(f"{export}: {served.problem}")
    return Model(served, config)


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as the Python numbers and lists a request holds."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), mode="L")
