"""The evaluation panel and the servable export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from biglearn.export import ExportError, load_export, write_export
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer
from biglearn.panel import evaluate_panel, panel_tasks
from biglearn.roles import ABSENT, SOURCE, TARGET

V, LEN = 5, 16


def make_model(grid=None, std: float | None = 0.3, retrieval: int = 0) -> UniversalTransformer:
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, retrieval_neighbours=retrieval)
    rows = 20 if retrieval else 0
    model = UniversalTransformer(ModelSpec(model=cfg, length=LEN, vocab_size=V, grid=grid, memory_rows=rows))
    if retrieval:
        model.memory.remember(torch.randint(0, V, (rows, LEN), generator=torch.Generator().manual_seed(5)))
    if std is not None:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("grid", [(4, 4), None])
def test_evaluate_panel_names_finite_and_deterministic(grid):
    model = make_model(grid).train()
    values = torch.randint(0, V, (10, LEN), generator=torch.Generator().manual_seed(1))
    scores = evaluate_panel(model, values, grid, steps=3, batch_size=4)
    assert list(scores) == list(panel_tasks(LEN, grid))
    assert all(math.isfinite(s) and s > 0 for s in scores.values()), scores
    assert model.training  # the caller's mode is restored
    assert evaluate_panel(model, values, grid, steps=3, batch_size=4) == scores
    # and it does depend on the model
    other = make_model(grid, std=0.31)
    assert evaluate_panel(other, values, grid, steps=3, batch_size=4) != scores


def test_panel_scores_are_per_target_token():
    # a freshly initialised model predicts about uniformly: every task scores about log V nats/token
    model = make_model(std=None)
    with torch.no_grad():
        model.head.weight.zero_()  # exactly uniform predictions
    values = torch.randint(0, V, (6, LEN), generator=torch.Generator().manual_seed(2))
    for name, score in evaluate_panel(model, values, None, steps=2).items():
        assert score == pytest.approx(math.log(V), rel=1e-5), name


def test_panel_tasks_are_the_documented_ones():
    # name: (targets, sources, absent) per row, for L = 16
    counts = {
        "joint": (16, 0, 0),
        "random_50": (8, 8, 0),
        "random_90": (14, 2, 0),
        "marginal_25": (4, 0, 12),
    }
    halves = {(4, 4): ["bottom_half", "top_half", "right_half"], None: ["second_half", "first_half"]}
    for grid, names in halves.items():
        tasks = panel_tasks(LEN, grid)
        assert list(tasks) == ["joint", *names, "random_50", "random_90", "marginal_25"]
        for name, make in tasks.items():
            roles = make(8, torch.Generator().manual_seed(0))
            assert roles.shape == (8, LEN) and roles.dtype == torch.int8, name
            got = {((r == TARGET).sum().item(), (r == SOURCE).sum().item(), (r == ABSENT).sum().item()) for r in roles}
            assert got == {counts.get(name, (8, 8, 0))}, (name, got)
            again = make(8, torch.Generator().manual_seed(0))
            assert torch.equal(roles, again), name
            if name.startswith("random") or name.startswith("marginal"):
                assert not (roles == roles[:1]).all(), name  # a different task per example


@pytest.mark.parametrize("retrieval", [0, 3])
def test_export_round_trip(tmp_path, retrieval):
    model = make_model(grid=(4, 4), retrieval=retrieval).eval()
    spec = model.spec
    folder = write_export(tmp_path / "export", model.state_dict(), spec, {"name": "toy"}, {"train": {"steps": 3}})
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "model.json", "manifest.json", "config.json"}
    assert json.loads((folder / "manifest.json").read_text()) == {"name": "toy"}
    loaded, loaded_spec = load_export(folder)
    assert loaded_spec == spec and loaded_spec.grid == (4, 4)
    assert not loaded.training
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, V, (4, LEN), generator=g)
    roles = torch.randint(0, 3, (4, LEN), generator=g).to(torch.int8)
    roles[:, 0] = TARGET
    with torch.no_grad():
        assert torch.equal(loaded(values, roles), model(values, roles))
    if retrieval:  # the memory travels with the weights, as the tokens it was
        assert load_file(folder / "model.safetensors")["memory.examples"].dtype == torch.long
        assert torch.equal(loaded.memory.examples, model.memory.examples)


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must never be called by the export loader")

    monkeypatch.setattr(torch, "load", refuse)


def test_export_refuses_pickled_weights(tmp_path, no_unpickling):
    model = make_model()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(model.state_dict(), pickled / "model.pt")
    with pytest.raises(ExportError, match=r"model\.pt"):
        load_export(pickled)
    # a spec next to the pickle does not make it loadable either
    (pickled / "model.json").write_text(model.spec.model_dump_json())
    with pytest.raises(ExportError, match=r"model\.safetensors is missing.*model\.pt"):
        load_export(pickled)


def test_export_refuses_incomplete_or_corrupt_folders(tmp_path, no_unpickling):
    model = make_model()
    folder = write_export(tmp_path / "export", model.state_dict(), model.spec, {}, {})
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ExportError, match=r"model\.safetensors"):
        load_export(folder)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "model.json").write_text('{"model": {"d_model": 32}, "length": "long"}')
    with pytest.raises(ExportError, match=r"model\.json is not a valid model spec"):
        load_export(folder)
    (folder / "model.json").unlink()
    with pytest.raises(ExportError, match=r"model\.json is missing"):
        load_export(folder)
    with pytest.raises(ExportError, match="model.json"):
        load_export(tmp_path / "does-not-exist")
