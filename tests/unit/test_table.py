"""Tables: values to tokens and back, CSV/TSV/Parquet into a dataset with missing cells, missing
cells in no task, and each position emitting only its own column's values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from biglearn.data.manifest import MISSING, DatasetError, read_manifest, read_split, verify_shards
from biglearn.data.prepare import PrepareConfig, prepare_dataset
from biglearn.data.table import decode, encode, expected_cells, fit_schema
from biglearn.generation import complete
from biglearn.model import OUTSIDE_LOGIT, ModelConfig, ModelSpec, UniversalTransformer
from biglearn.roles import ABSENT, TARGET, Schedule, sample_roles, without_missing


def mixed_table(rows: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.4, rows).astype(float)  # mostly zeros: a point mass
    income = rng.lognormal(10, 1, rows)
    colour = rng.choice(np.array(["red", "green", "blue"], dtype=object), rows)
    flag = rng.random(rows) < 0.3
    for column in (counts, income):
        column[rng.random(rows) < 0.2] = np.nan
    colour[rng.random(rows) < 0.2] = None
    flag = flag.astype(object)
    flag[rng.random(rows) < 0.2] = None
    return {"count": counts, "income": income, "colour": colour, "flag": flag}


KINDS = {"count": "numeric", "income": "numeric", "colour": "categorical", "flag": "boolean"}


def test_values_become_tokens_of_their_column_and_come_back_within_their_bin():
    table = mixed_table()
    schema = fit_schema(table, KINDS, np.arange(150), bins=8)
    tokens = encode(schema, table)
    assert tokens.shape == (200, 4) and tokens.dtype == np.int32
    for index, (start, end) in enumerate(schema.position_vocab):
        column = tokens[:, index]
        assert ((column == MISSING) | ((column >= start) & (column < end))).all()
    back = decode(schema, tokens, np.random.default_rng(1))

    count, income = schema.columns[0], schema.columns[1]
    assert count.integer and not income.integer
    assert count.edges[0] == count.edges[1] == 0.0  # the zeros' own bin: they come back exactly
    observed = ~np.isnan(table["count"])
    assert np.array_equal(np.isnan(back["count"]), ~observed)
    assert np.array_equal(back["count"][table["count"] == 0], np.zeros((table["count"] == 0).sum()))
    assert np.all(back["count"][observed] == np.round(back["count"][observed]))
    for name, column in (("count", count), ("income", income)):
        values, drawn, edges = table[name], back[name], np.asarray(column.edges)
        present = ~np.isnan(values)
        bins = tokens[present, list(table).index(name)] - column.offset
        assert np.all(drawn[present] >= edges[bins]) and np.all(drawn[present] <= edges[bins + 1])
    drawn_income = back["income"][~np.isnan(back["income"])]
    assert len(np.unique(drawn_income)) > len(income.edges)  # continuous, not bin centres
    assert list(back["colour"]) == list(table["colour"])
    assert list(back["flag"]) == list(table["flag"])


def test_a_column_without_values_is_refused_by_name():
    table = {**mixed_table(), "empty": np.full(200, np.nan)}
    with pytest.raises(DatasetError, match="column 'empty' has no value in the training split"):
        fit_schema(table, {**KINDS, "empty": "numeric"}, np.arange(150), bins=8)


def test_a_constant_column_is_one_zero_width_bin_and_comes_back_exactly():
    table = {"constant": np.array([3.0, 3.0, np.nan, 3.0]), "x": np.array([1.0, 2.0, 3.0, 4.0])}
    schema = fit_schema(table, {"constant": "numeric", "x": "numeric"}, np.arange(4), bins=4)
    assert schema.columns[0].edges == [3.0, 3.0] and schema.columns[0].size == 1
    back = decode(schema, encode(schema, table), np.random.default_rng(0))
    assert np.array_equal(back["constant"], table["constant"], equal_nan=True)


def write_csv(path: Path, rows: int = 120) -> Path:
    rng = np.random.default_rng(0)
    lines = ["age,city,smoker,score"]
    for _ in range(rows):
        cells = [
            str(int(rng.integers(18, 90))),
            rng.choice(["Oslo", "Lima", "Pune"]),
            rng.choice(["true", "false"]),
            f"{rng.normal():.3f}",
        ]
        cells = [("NA" if rng.random() < 0.5 else "") if rng.random() < 0.3 else cell for cell in cells]
        lines.append(",".join(cells))
    lines.append(",,,")  # a row with no value: dropped
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(tmp_path: Path, files: str, **source) -> tuple[str, object]:
    output = str(tmp_path / "dataset")
    cfg = PrepareConfig.model_validate(
        {
            "source": {"kind": "table", "files": files, "bins": 6, **source},
            "output": output,
            "rows_per_shard": 50,
            "validation_fraction": 0.2,
        }
    )
    return output, prepare_dataset(cfg)


def test_a_csv_with_missing_cells_becomes_a_verified_table_dataset(tmp_path):
    output, manifest = prepare(tmp_path, str(write_csv(tmp_path / "people.csv")))
    assert (
        manifest.length == 4
        and manifest.kind == "discrete"
        and manifest.rows("train") + manifest.rows("validation") == 120
    )
    columns = {column.name: column for column in manifest.table.columns}
    assert [columns[name].type for name in ("age", "city", "smoker", "score")] == [
        "numeric",
        "categorical",
        "boolean",
        "numeric",
    ]
    assert columns["city"].categories == ["Lima", "Oslo", "Pune"] and columns["age"].integer
    assert manifest.vocab_size == manifest.table.vocab_size
    verify_shards(output, manifest, ["train", "validation"])
    values = read_split(output, manifest, "train")["values"]
    assert 0.2 < (values == MISSING).mean() < 0.4  # "" and NA both read as missing
    assert json.loads((Path(output) / "manifest.json").read_text())["table"]["columns"][0]["name"] == "age"

    # A token outside its column's range (a shard edited by hand) is named before training.
    text = json.loads((Path(output) / "manifest.json").read_text())
    text["table"]["columns"][1]["categories"] = ["Lima", "Oslo"]
    (Path(output) / "manifest.json").write_text(json.dumps(text))
    with pytest.raises(DatasetError, match="column 'city' holds token"):
        verify_shards(output, read_manifest(output), ["train", "validation"])


def test_tsv_parquet_folders_selection_and_categorical_codes(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    table = pa.table({"code": [1, 2, 3, 2, None] * 8, "x": [0.5, None, 1.5, 2.0, 3.0] * 8, "note": ["a"] * 40})
    pq.write_table(table.slice(0, 20), folder / "a.parquet")
    pq.write_table(table.slice(20), folder / "b.parquet")
    _, manifest = prepare(tmp_path, str(folder), columns=["x", "code"], categorical=["code"])
    assert [(c.name, c.type) for c in manifest.table.columns] == [("x", "numeric"), ("code", "categorical")]
    assert manifest.table.columns[1].categories == ["1", "2", "3"]

    with pytest.raises(DatasetError, match=r"column\(s\) \['age'\] not in"):
        prepare(tmp_path / "other", str(folder), columns=["age"])
    tsv = tmp_path / "t.tsv"
    tsv.write_text("a\tb\n1\tx\n2\ty\n3\t\n4\tx\n5\ty\n")
    _, small = prepare(tmp_path / "tsv", str(tsv))
    assert [c.type for c in small.table.columns] == ["numeric", "categorical"]


def test_missing_cells_are_never_sources_or_targets_and_every_row_keeps_a_target():
    generator = torch.Generator().manual_seed(0)
    schedule = Schedule(
        families={"conditional": {"weight": 0.6}, "marginal": {"weight": 0.2}, "joint": {"weight": 0.2}}
    )
    roles, _ = sample_roles(schedule, 512, 6, generator)
    observed = torch.rand(512, 6, generator=generator) > 0.6
    observed[0] = False  # nothing observed: nothing to learn
    masked = without_missing(roles, observed, generator)
    assert (masked[~observed] == ABSENT).all()
    has_target = (masked == TARGET).any(1)
    assert has_target[1:][observed[1:].any(1)].all() and not has_target[0]
    kept = observed & (roles != ABSENT)
    assert (masked[kept] == roles[kept]).sum() >= 0.9 * kept.sum()  # only orphans get a new target


def test_each_position_emits_only_its_own_columns_values():
    ranges = [(0, 3), (3, 4), (4, 9)]
    spec = ModelSpec(
        model=ModelConfig(d_model=16, num_layers=1, num_heads=2), length=3, vocab_size=9, position_vocab=ranges
    )
    model = UniversalTransformer(spec).eval()
    values = torch.zeros(64, 3, dtype=torch.long)
    roles = torch.full((64, 3), TARGET, dtype=torch.int8)
    logits = model(values, roles)
    for position, (start, end) in enumerate(ranges):
        outside = torch.ones(9, dtype=torch.bool)
        outside[start:end] = False
        assert (logits[:, position, outside] == OUTSIDE_LOGIT).all()
        assert (logits[:, position, ~outside] > OUTSIDE_LOGIT / 2).all()
    samples = complete(model, values, roles, torch.Generator().manual_seed(0), steps=3, guidance=1.0)
    for position, (start, end) in enumerate(ranges):
        assert ((samples[:, position] >= start) & (samples[:, position] < end)).all()
    with pytest.raises(ValueError, match="position_vocab"):
        ModelSpec(model=spec.model, length=3, vocab_size=9, position_vocab=[(0, 3), (3, 10), (4, 9)])


def test_point_estimates_are_the_expected_number_and_the_most_probable_category():
    schema = fit_schema(
        {"x": np.array([0.0, 1.0, 2.0, 4.0]), "c": np.array(["a", "b", "b", "a"], dtype=object)},
        {"x": "numeric", "c": "categorical"},
        np.arange(4),
        3,
    )
    x, c = schema.columns
    probs_NLV = np.full((2, 2, schema.vocab_size), 1e-30)  # other columns' tokens: never read
    probs_NLV[0, 0, x.offset : x.offset + x.size] = [0.5, 0.5, 1e-30]  # bins [0, 1), [1, 2), [2, 4]
    probs_NLV[1, 0, x.offset + 2] = 1.0
    probs_NLV[:, 1, c.offset : c.offset + 2] = [[0.3, 0.7], [0.6, 0.4]]
    assert x.edges == [0.0, 1.0, 2.0, 4.0] and x.integer
    # Whole numbers: [0, 1) holds 0, [1, 2) holds 1, the last bin [2, 4] holds 2, 3 and 4.
    estimate = expected_cells(schema, np.log(probs_NLV))
    assert np.allclose(estimate["x"], [0.5 * 0 + 0.5 * 1, 3.0]) and list(estimate["c"]) == ["b", "a"]
    real = schema.model_copy(update={"columns": [x.model_copy(update={"integer": False}), c]})
    assert np.allclose(expected_cells(real, np.log(probs_NLV))["x"], [0.5 * 0.5 + 0.5 * 1.5, 3.0])
    drawn = decode(
        schema,
        np.repeat(np.array([[x.offset, c.offset], [x.offset + 1, c.offset], [x.offset + 2, c.offset]]), 200, 0),
        np.random.default_rng(0),
    )["x"]
    assert set(drawn[:200]) == {0} and set(drawn[200:400]) == {1} and set(drawn[400:]) == {2, 3, 4}
