"""`Imputer`: a scikit-learn estimator over tables, backed by one big-learning model.

    from biglearn.tables import Imputer
    imputer = Imputer(steps=1000).fit(frame)      # a DataFrame of mixed columns, or numbers with NaN
    filled = imputer.transform(frame)             # every missing cell of every row, whatever the pattern
    draws = imputer.sample_imputations(frame, 5)  # multiple imputation
    rows = imputer.sample(100, given={"sex": "F"})
    imputer.save("exports/people"); Imputer.load("exports/people")

One model learns p(x_T | x_S) for every set of columns (big learning), so the same weights fill
any pattern of missing cells (T = the missing cells, S = the observed ones), draw synthetic rows
(S = {}) and answer with some columns fixed. `fit` converts the table (biglearn/data/table.py)
and trains through `jobs/pretrain.py`'s own path (Ray Train + DeepSpeed, a local Ray unless
RAY_ADDRESS names a cluster); `load` also takes an export trained on a table by
`jobs/pretrain.py`. `transform`'s point estimates are expectations under the model's
distribution of each missing cell given the row's observed ones: the mean for numbers, the most
probable value otherwise.

Legend: N = rows, L = columns, K = draws.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin

from biglearn.data.manifest import MISSING, DatasetError, Manifest, TableSchema
from biglearn.data.table import decode, encode, expected_cells
from biglearn.generation import complete
from biglearn.roles import SOURCE, TARGET

TRANSFORM_ROWS = 4096  # rows per model call in `transform`: memory stays flat for any X


class Imputer(TransformerMixin, BaseEstimator):
    """Fills missing cells, draws multiple imputations and synthetic rows with one model.

    Args:
        steps, batch_size, lr: training (optimizer steps, rows per step (at most the rows given to
            `fit`, so a small table trains with its defaults), peak learning rate).
        d_model, num_layers, num_heads: the transformer's size; dropout: its dropout rate (small
            tables are seen hundreds of times over in training).
        bins: quantile bins per numeric column (fitted on the rows given to `fit`); few bins suit
            tables of hundreds of rows (each bin's probability is learned from its rows), more
            bins large tables.
        categorical: columns holding numbers that are categories.
        decode_steps: decoding steps per completion (each reveals a share of the targets).
        seed: training and sampling seed.
        workers: Ray Train workers.
    """

    def __init__(
        self,
        steps: int = 1000,
        batch_size: int = 128,
        lr: float = 1e-3,
        d_model: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        dropout: float = 0.1,
        bins: int = 8,
        categorical: tuple[str, ...] = (),
        decode_steps: int = 4,
        seed: int = 0,
        workers: int = 1,
    ):
        self.steps, self.batch_size, self.lr = steps, batch_size, lr
        self.d_model, self.num_layers, self.num_heads, self.dropout = d_model, num_layers, num_heads, dropout
        self.bins, self.categorical, self.decode_steps = bins, categorical, decode_steps
        self.seed, self.workers = seed, workers

    # --- training ------------------------------------------------------------------------------

    def fit(self, X, y=None) -> Imputer:
        """Trains on the rows of X (no complete row needed); returns self."""
        from biglearn.config import load_config
        from biglearn.data.prepare import write_source
        from biglearn.data.sources import TableSource
        from biglearn.export import load_export
        from biglearn.train.config import PretrainConfig
        from biglearn.train.run import pretrain

        names, values, kinds = _table_of(X, list(self.categorical))
        rows = len(next(iter(values.values()))) if values else 0
        batch_size = max(self.workers, min(self.batch_size, rows // self.workers * self.workers))
        with tempfile.TemporaryDirectory(prefix="biglearn-imputer-") as scratch:
            source = TableSource("table", values, kinds, self.bins, {"rows": _digest(values)})
            write_source(
                source, f"{scratch}/data", name="table", validation_fraction=0.0, seed=self.seed, rows_per_shard=100_000
            )
            families = (
                "{conditional: {weight: 0.6, source: {a: 4, b: 1}}, marginal: {weight: 0.2}, joint: {weight: 0.2}}"
            )
            settings = [
                f"data.path={scratch}/data",
                "data.validation_split=train",
                f"run.storage={scratch}/runs",
                "run.name=imputer",
                f"model.d_model={self.d_model}",
                f"model.num_layers={self.num_layers}",
                f"model.num_heads={self.num_heads}",
                f"model.dropout={self.dropout}",
                f"schedule.families={families}",
                f"optim.lr={self.lr}",
                f"optim.batch_size={batch_size}",
                f"optim.warmup_steps={min(100, max(1, self.steps // 10))}",
                f"train.steps={self.steps}",
                f"train.seed={self.seed}",
                f"train.log_every={max(1, self.steps // 10)}",
                f"train.checkpoint_every={self.steps}",
                f"cluster.num_workers={self.workers}",
                "eval.panel_examples=256",
                "eval.panel_steps=2",
            ]
            outcome = pretrain(load_config(PretrainConfig, None, settings))
            model, spec = load_export(outcome.export)
            manifest = json.loads((Path(outcome.export) / "manifest.json").read_text())
        self._adopt(model, Manifest.model_validate(manifest), names)
        return self

    def _adopt(self, model, manifest: Manifest, names: list[str]) -> None:
        if manifest.table is None:
            raise DatasetError("this export was not trained on a table (its manifest has no `table`)")
        self.model_, self.manifest_ = model.eval(), manifest
        self.schema_: TableSchema = manifest.table
        self.feature_names_in_ = np.array(names, dtype=object)
        self.n_features_in_ = len(names)

    # --- use -----------------------------------------------------------------------------------

    def transform(self, X):
        """X with every missing cell filled by its expected value (numeric) or most probable value
        under the model's p(cell | the row's observed cells), read from one pass of the model
        (no sampling noise); observed cells unchanged. Same type as X."""
        cells = self._read(X)
        values_NL, roles_NL, given_NL = self._tasks(cells)
        with torch.no_grad():
            logits_NLV = torch.cat(
                [
                    self.model_(values_NL[rows], roles_NL[rows]).float()
                    for rows in torch.arange(len(values_NL)).split(TRANSFORM_ROWS)
                ]
            ).numpy()
        return _like(X, list(self.feature_names_in_), _kept(cells, given_NL, expected_cells(self.schema_, logits_NLV)))

    def sample_imputations(self, X, n_draws: int) -> list:
        """`n_draws` completions of X (multiple imputation), each the same type as X."""
        names = list(self.feature_names_in_)
        return [_like(X, names, draw) for draw in self._completions(X, n_draws)]

    def sample(self, n_rows: int, given: dict | None = None, seed: int | None = None):
        """`n_rows` synthetic rows as a dict {column: values}; `given` fixes columns ({name: value})."""
        names = list(self.feature_names_in_)
        given = given or {}
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"given names column(s) {unknown} that the model does not have; it has {names}")
        cells = {name: np.full(n_rows, given.get(name, None), dtype=object) for name in names}
        for column in self.schema_.columns:
            if column.type == "numeric":
                cells[column.name] = np.array(
                    [np.nan if v is None else v for v in cells[column.name]], dtype=np.float64
                )
        return self._fill(cells, 1, self.seed if seed is None else seed)[0]

    def _completions(self, X, count: int) -> list[dict[str, np.ndarray]]:
        return self._fill(self._read(X), count, self.seed)

    def _read(self, X) -> dict[str, np.ndarray]:
        """{column: values} of X, checked against the columns the imputer was fitted on."""
        self._check_fitted()
        names, values, _ = _table_of(X, list(self.categorical), fitted=self)
        if names != list(self.feature_names_in_):
            raise ValueError(
                f"X has columns {names}; the imputer was fitted on {list(self.feature_names_in_)} "
                "(same names, same order)"
            )
        return values

    def _fill(self, cells: dict[str, np.ndarray], count: int, seed: int) -> list[dict[str, np.ndarray]]:
        """`count` completions of the missing cells of `cells` ({column: values}); the others as given."""
        values_NL, roles_NL, given_NL = self._tasks(cells)
        rng = np.random.default_rng(seed)
        out = []
        with torch.no_grad():
            for draw in range(count):
                generator = torch.Generator().manual_seed(seed * 1000 + draw)
                filled = complete(self.model_, values_NL, roles_NL, generator, steps=self.decode_steps).numpy()
                out.append(_kept(cells, given_NL, decode(self.schema_, filled.astype(np.int32), rng)))
        return out

    def _tasks(self, cells: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(tokens_NL, roles_NL, given_NL) of {column: values}: observed cells are sources, missing
        ones targets (their MISSING placeholder is never read)."""
        tokens_NL = encode(self.schema_, cells)
        given_NL = tokens_NL != MISSING
        roles_NL = torch.where(torch.from_numpy(given_NL), SOURCE, TARGET).to(torch.int8)
        return torch.from_numpy(tokens_NL).long(), roles_NL, given_NL

    # --- persistence ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Writes a normal export (safetensors, model.json, manifest.json) plus these settings."""
        from biglearn.export import write_export

        self._check_fitted()
        write_export(
            Path(path),
            self.model_.state_dict(),
            self.model_.spec,
            self.manifest_.model_dump(mode="json"),
            {"imputer": self.get_params()},
        )

    @classmethod
    def load(cls, path: str | Path, **settings) -> Imputer:
        """An imputer from an export: one saved by `save`, or one `jobs/pretrain.py` trained on a table."""
        from biglearn.export import load_export

        model, _ = load_export(Path(path))
        manifest = Manifest.model_validate(json.loads((Path(path) / "manifest.json").read_text()))
        saved = json.loads((Path(path) / "config.json").read_text()).get("imputer", {})
        saved = {key: value for key, value in saved.items() if key in cls._get_param_names()}  # settings since retired
        if "categorical" in saved:
            saved["categorical"] = tuple(saved["categorical"])  # JSON made it a list
        imputer = cls(**{**saved, **settings})
        imputer._adopt(model, manifest, [column.name for column in manifest.table.columns] if manifest.table else [])
        return imputer

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise ValueError("this Imputer is not fitted yet: call fit(X) or Imputer.load(path) first")


def _kept(cells: dict[str, np.ndarray], given_NL: np.ndarray, filled: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`filled` with the given cells of `cells` put back exactly as they came."""
    return {
        name: np.where(given_NL[:, index], cells[name], filled[name]).astype(filled[name].dtype)
        for index, name in enumerate(filled)
    }


def _table_of(X, categorical: list[str], fitted: Imputer | None = None) -> tuple[list[str], dict, dict]:
    """(column names, {column: values}, {column: kind}) of a DataFrame or a 2-D array. With
    `fitted`, values are read as its columns' kinds, and a cell that cannot be is named."""
    import pyarrow as pa

    from biglearn.data.sources import arrow_columns

    if hasattr(X, "columns") and hasattr(X, "dtypes"):  # a pandas DataFrame
        names = [str(name) for name in X.columns]
        columns = {str(name): list(X[name].astype(object).where(X[name].notna(), None)) for name in X.columns}
    else:
        array = np.asarray(X, dtype=object if np.asarray(X).dtype.kind not in "fiub" else None)
        if array.ndim != 2:
            raise ValueError(f"X must be 2-D (rows x columns), got shape {array.shape}")
        names = [f"x{index}" for index in range(array.shape[1])]
        columns = {
            name: [None if _is_missing(v) else v for v in array[:, index].tolist()] for index, name in enumerate(names)
        }
    if fitted is None:
        values, kinds = arrow_columns(
            pa.table({name: _arrow(cells) for name, cells in columns.items()}), names, categorical, []
        )
        return names, values, kinds
    values = {}
    for column in fitted.schema_.columns:
        cells = columns.get(column.name, [])
        if column.type == "numeric":
            values[column.name] = np.array(
                [_number(cell, column.name, row) for row, cell in enumerate(cells)], np.float64
            )
        else:
            values[column.name] = np.array(cells, dtype=object)
    return names, values, {}


def _arrow(cells: list):
    import pyarrow as pa

    try:
        return pa.array(cells)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: categories by their text
        return pa.array([None if cell is None else str(cell) for cell in cells])


def _number(cell, name: str, row: int) -> float:
    if cell is None:
        return np.nan
    try:
        return float(cell)
    except (TypeError, ValueError):
        raise ValueError(f"column {name!r}, row {row}: {cell!r} is not a number, and the column is numeric") from None


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _like(X, names: list[str], values: dict[str, np.ndarray]):
    """`values` in the form of X: a DataFrame with X's index, or an array (float when every column
    is numeric, else object)."""
    if hasattr(X, "columns") and hasattr(X, "dtypes"):
        import pandas as pd

        return pd.DataFrame({name: values[name] for name in names}, index=X.index)
    columns = [values[name] for name in names]
    numeric = all(column.dtype.kind == "f" for column in columns)
    return np.stack(columns, 1).astype(np.float64 if numeric else object)


def _digest(values: dict[str, np.ndarray]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, cells in values.items():
        digest.update(name.encode() + repr(cells.tolist()).encode())
    return digest.hexdigest()
