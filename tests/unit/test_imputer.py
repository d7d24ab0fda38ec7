"""The Imputer's contract without training: scikit-learn's estimator conventions, the shapes and
types it returns, and the errors bad input gets (an untrained model stands in)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import (
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_set_params,
)

from biglearn.data.manifest import Manifest
from biglearn.data.table import fit_schema
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer
from biglearn.tables import Imputer


def frame(rows: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    data = pd.DataFrame(
        {
            "age": rng.integers(20, 70, rows).astype(float),
            "city": rng.choice(["Oslo", "Lima"], rows).astype(object),
            "smoker": rng.random(rows) < 0.3,
        }
    )
    data.loc[rng.random(rows) < 0.25, "age"] = np.nan
    data.loc[rng.random(rows) < 0.25, "city"] = None
    return data


def untrained(data: pd.DataFrame, **settings) -> Imputer:
    """An Imputer holding an untrained model of `data`'s table (as `fit` would leave it)."""
    values = {
        "age": data["age"].to_numpy(),
        "city": data["city"].to_numpy(object),
        "smoker": data["smoker"].to_numpy(object),
    }
    schema = fit_schema(values, {"age": "numeric", "city": "categorical", "smoker": "boolean"}, np.arange(len(data)), 4)
    spec = ModelSpec(
        model=ModelConfig(d_model=16, num_layers=1, num_heads=2),
        length=3,
        vocab_size=schema.vocab_size,
        position_vocab=schema.position_vocab,
    )
    manifest = Manifest(
        name="t", kind="discrete", length=3, vocab_size=schema.vocab_size, columns=["values"], splits={}, table=schema
    )
    imputer = Imputer(**settings)
    imputer._adopt(UniversalTransformer(spec), manifest, list(data.columns))
    return imputer


def test_scikit_learn_conventions():
    imputer = Imputer(steps=10, bins=4)
    check_no_attributes_set_in_init("Imputer", imputer)
    check_get_params_invariance("Imputer", imputer)
    check_set_params("Imputer", imputer)
    assert clone(imputer).get_params() == imputer.get_params()
    with pytest.raises(ValueError, match="not fitted yet"):
        imputer.transform(frame())


def test_transform_fills_missing_cells_only_and_keeps_the_input_type(tmp_path):
    data = frame()
    imputer = untrained(data)
    filled = imputer.transform(data)
    assert (
        isinstance(filled, pd.DataFrame)
        and list(filled.columns) == list(data.columns)
        and (filled.index == data.index).all()
    )
    assert not filled.isna().any().any()
    observed = data.notna()
    for name in data.columns:
        assert (filled[name][observed[name]] == data[name][observed[name]]).all(), name
    assert set(filled["city"]) <= {"Oslo", "Lima"} and set(filled["smoker"]) <= {True, False}
    assert filled["age"].between(data["age"].min(), data["age"].max()).all()

    draws = imputer.sample_imputations(data, 2)
    assert len(draws) == 2 and all(isinstance(draw, pd.DataFrame) for draw in draws)
    rows = imputer.sample(5, given={"city": "Lima"})
    assert list(rows["city"]) == ["Lima"] * 5 and len(rows["age"]) == 5

    imputer.save(tmp_path / "export")
    again = Imputer.load(tmp_path / "export")
    assert again.get_params() == imputer.get_params()
    assert again.transform(data).equals(filled)  # same weights, same answer


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            lambda d: d.assign(age=d["age"].astype(object).where(d.index != 3, "forty")),
            "column 'age', row 3: 'forty' is not a number",
        ),
        (
            lambda d: d.assign(city=d["city"].where(d.index != 5, "Pune")),
            "column 'city', row 5: 'Pune' is not one of its categories",
        ),
        (
            lambda d: d[["city", "age", "smoker"]],
            r"X has columns \['city', 'age', 'smoker'\]; the imputer was fitted on \['age', 'city', 'smoker'\]",
        ),
        (lambda d: d.drop(columns=["smoker"]), r"X has columns \['age', 'city'\]"),
    ],
)
def test_bad_input_is_named(change, expected):
    data = frame()
    imputer = untrained(data)
    with pytest.raises(ValueError, match=expected):
        imputer.transform(change(data))
    with pytest.raises(ValueError, match="given names column"):
        imputer.sample(2, given={"town": "Oslo"})
