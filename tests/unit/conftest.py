"""Unit tests run tiny models on a shared machine: one intra-op thread avoids oversubscription.
Untrained exports (a token image model and a table model) shared by the serving and API tests."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from biglearn.export import write_export
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer
from tests.exports import write_table_export

H, W, V = 4, 4, 5
L = H * W

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory):
    """A token model that retrieves (as the digits recipes do) from a memory of 12 random rows."""
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, retrieval_neighbours=3)
    spec = ModelSpec(model=cfg, length=L, vocab_size=V, grid=(H, W), memory_rows=12)
    model = UniversalTransformer(spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a larger spread than the init, so that the context matters
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.memory.remember(torch.randint(0, V, (12, L), generator=g))
    folder = tmp_path_factory.mktemp("export")
    manifest = {"name": "toy", "kind": "discrete", "length": L, "vocab_size": V, "geometry": {"height": H, "width": W}}
    write_export(folder, model.state_dict(), spec, manifest, {"run": {"name": "toy"}, "seed": 1})
    (folder / "panel.json").write_text(json.dumps({"panel_nll": {"joint": 1.5}}))
    return folder


@pytest.fixture(scope="module")
def table_export_folder(tmp_path_factory) -> Path:
    """An untrained model of a table with an integer, a real, a categorical and a boolean column."""
    rng = np.random.default_rng(0)
    table = {
        "age": rng.integers(18, 90, 200).astype(float),
        "income": rng.lognormal(10, 1, 200),
        "city": rng.choice(np.array(["Lima", "Oslo", "Pune"], dtype=object), 200),
        "smoker": (rng.random(200) < 0.3).astype(object),
    }
    kinds = {"age": "numeric", "income": "numeric", "city": "categorical", "smoker": "boolean"}
    return write_table_export(tmp_path_factory.mktemp("table-export"), table, kinds, bins=6)
