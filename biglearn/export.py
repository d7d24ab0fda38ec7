"""The servable export: a folder a server can load without unpickling anything.

model.safetensors   weights
model.json          ModelSpec (architecture, L, V, grid)
manifest.json       the training dataset's manifest (what the values mean)
config.json         the resolved training config (no secrets)
panel.json          panel scores, when evaluation ran (written by the evaluator)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from biglearn.model import ModelSpec, UniversalTransformer

WEIGHTS = "model.safetensors"
SPEC = "model.json"


class ExportError(ValueError):
    """An export folder that cannot be loaded; the message names the file."""


def write_export(
    folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    spec: ModelSpec,
    manifest: dict[str, Any],
    config: dict[str, Any],
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Weights as float32 whatever precision trained them; integer buffers (a retrieval memory's
    # tokens) as they are.
    tensors = {
        name: t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous()
        for name, t in state_dict.items()
    }
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    # Written last: a folder with model.json has all of the above.
    (folder / SPEC).write_text(spec.model_dump_json(indent=2))
    return folder


def load_export(folder: str | Path, device: str | torch.device = "cpu") -> tuple[UniversalTransformer, ModelSpec]:
    folder = Path(folder)
    spec_path, weights_path = folder / SPEC, folder / WEIGHTS
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in {".pt", ".bin", ".pth"}) if folder.is_dir() else []
    extra = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
    if not spec_path.is_file():
        raise ExportError(f"{folder} is not a complete export: {SPEC} is missing{extra}")
    if not weights_path.is_file():
        raise ExportError(f"{folder}: {WEIGHTS} is missing{extra}")
    try:
        spec = ModelSpec.model_validate_json(spec_path.read_text())
    except ValueError as exc:  # pydantic's ValidationError (bad JSON or fields) is a ValueError
        raise ExportError(f"{spec_path} is not a valid model spec: {exc}") from None
    model = UniversalTransformer(spec)
    try:
        state = load_file(weights_path, device=str(device))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ExportError(f"{weights_path} is not a readable safetensors file: {exc}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{weights_path} does not match {SPEC}: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), spec
