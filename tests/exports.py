"""Untrained exports, for tests that load or serve a model without training one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biglearn.data.table import fit_schema
from biglearn.export import write_export
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer


def write_table_export(folder: Path, table: dict[str, np.ndarray], kinds: dict[str, str], bins: int) -> Path:
    """An untrained one-layer model of `table` ({column: cells}, `kinds` {column: type}), every row
    fitted, written as an export into `folder`."""
    rows = len(next(iter(table.values())))
    schema = fit_schema(table, kinds, np.arange(rows), bins=bins)
    spec = ModelSpec(
        model=ModelConfig(d_model=16, num_layers=1, num_heads=2),
        length=len(kinds),
        vocab_size=schema.vocab_size,
        position_vocab=schema.position_vocab,
    )
    manifest = {
        "name": "people",
        "kind": "discrete",
        "length": len(kinds),
        "vocab_size": schema.vocab_size,
        "table": schema.model_dump(mode="json"),
    }
    write_export(folder, UniversalTransformer(spec).state_dict(), spec, manifest, {})
    return folder
