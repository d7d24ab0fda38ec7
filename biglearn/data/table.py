"""Tables as token sequences: one position per column, every value a token of its own column.

A numeric column becomes tokens by quantile bins fitted on the training rows only; a value that
many rows share (a quantile repeated) gets a bin of its own, of zero width, so a point mass (all
the zeros of a count) comes back exactly. Categorical and boolean columns take one token per
value. Columns share one vocabulary: column c owns tokens [offset, offset + size), so a model
restricted to its position's range (`position_vocab`) emits only its own column's values. A
missing cell is the token MISSING (-1): never a source, never a target (roles.without_missing).

Numbers come back continuous: a sampled bin, then a value drawn uniformly within it (rounded
for columns whose training values are all whole numbers).

Legend: N = rows, L = columns.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import NonNegativeInt, PositiveInt

from biglearn.config import Config

MISSING = -1  # a table's missing cell


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the file and what to do."""


class TableColumn(Config):
    """One column of a table (encode and decode below map its values to tokens and back)."""

    name: str
    type: Literal["numeric", "categorical", "boolean"]
    offset: NonNegativeInt
    """The column's first token in the shared vocabulary."""
    edges: list[float] | None = None
    """numeric: bin edges (len = bins + 1); equal neighbours make a zero-width bin (a point mass)."""
    integer: bool = False
    """numeric: every training value was a whole number, so decoded values are rounded."""
    categories: list[str] | None = None
    """categorical/boolean: the values, in token order."""

    @property
    def size(self) -> int:
        if self.type == "numeric":
            assert self.edges is not None  # numeric columns have bin edges, the others categories
            return len(self.edges) - 1
        assert self.categories is not None
        return len(self.categories)


class TableSchema(Config):
    columns: list[TableColumn]

    @property
    def vocab_size(self) -> int:
        last = self.columns[-1]
        return last.offset + last.size

    @property
    def position_vocab(self) -> list[tuple[int, int]]:
        """[start, end) of the tokens each position (column) may hold."""
        return [(column.offset, column.offset + column.size) for column in self.columns]


def encode(schema: TableSchema, table: dict[str, np.ndarray]) -> np.ndarray:
    """{column: values (NaN / None where missing)} -> tokens [N, L] (int32, MISSING where missing)."""
    return np.stack([_encode_column(column, np.asarray(table[column.name])) for column in schema.columns], 1)


def decode(schema: TableSchema, tokens_NL: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """tokens [N, L] -> {column: values}: floats (NaN where missing) for numeric columns, objects
    (None where missing) for the others; numbers drawn within their bins."""
    return {column.name: _decode_column(column, tokens_NL[:, index], rng) for index, column in enumerate(schema.columns)}


def point_estimate(schema: TableSchema, draws: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One value per cell from K decoded draws ({column: values [N]} each): the mean for numeric
    columns, the most frequent value for the others (missing where every draw is)."""
    estimate = {}
    for column in schema.columns:
        stacked_KN = np.stack([draw[column.name] for draw in draws])
        estimate[column.name] = stacked_KN.mean(0) if column.type == "numeric" else _most_frequent(stacked_KN)
    return estimate


def expected_cells(schema: TableSchema, logits_NLV: np.ndarray) -> dict[str, np.ndarray]:
    """One value per cell from the model's logits of each cell [N, L, V] (each position's
    distribution over its own column's tokens): the expected value for numeric columns (a bin
    counts at the mean of the values `decode` draws within it), the most probable value for the
    others. These minimise the expected squared error and the expected error rate."""
    estimate = {}
    for index, column in enumerate(schema.columns):
        logits_NC = logits_NLV[:, index, column.offset : column.offset + column.size].astype(np.float64)
        if column.type == "numeric":
            probs_NC = np.exp(logits_NC - logits_NC.max(1, keepdims=True))
            low, high = _bin_ranges(column)
            estimate[column.name] = probs_NC @ ((low + high) / 2) / probs_NC.sum(1)
        else:
            tokens = column.offset + logits_NC.argmax(1)
            estimate[column.name] = _decode_column(column, tokens, np.random.default_rng(0))
    return estimate


def fit_schema(table: dict[str, np.ndarray], kinds: dict[str, str], train_rows: np.ndarray, bins: PositiveInt) -> TableSchema:
    """The schema of `table` ({column: values, floats with NaN or objects with None where
    missing}) whose columns are of `kinds` (numeric, categorical or boolean): bins from the rows
    `train_rows`, categories from every row."""
    columns, offset = [], 0
    for name, values in table.items():
        values = np.asarray(values)
        if kinds[name] == "boolean":
            column = TableColumn(name=name, type="boolean", offset=offset, categories=["false", "true"])
        elif kinds[name] == "numeric":
            train = values[train_rows].astype(np.float64)
            train = train[~np.isnan(train)]
            if not len(train):
                raise DatasetError(f"column {name!r} has no value in the training split; leave it out of source.columns")
            column = TableColumn(name=name, type="numeric", offset=offset, edges=quantile_edges(train, bins),
                                 integer=bool(np.all(train == np.round(train))))
        else:
            present = {_text(value) for value in values if not _missing(value)}
            if not present:
                raise DatasetError(f"column {name!r} has no value; leave it out of source.columns")
            column = TableColumn(name=name, type="categorical", offset=offset, categories=sorted(present))
        columns.append(column)
        offset += column.size
    return TableSchema(columns=columns)


def quantile_edges(values: np.ndarray, bins: int) -> list[float]:
    """Edges of up to `bins` quantile bins of `values`; a value repeated among the quantiles keeps
    two equal edges (its own zero-width bin) and no more."""
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, bins + 1))
    edges: list[float] = []
    for edge in quantiles.tolist():
        if len(edges) >= 2 and edges[-1] == edges[-2] == edge:
            continue
        edges.append(edge)
    return edges


def _encode_column(column: TableColumn, values: np.ndarray) -> np.ndarray:
    tokens = np.full(len(values), MISSING, dtype=np.int32)
    if column.type == "numeric":
        numbers = values.astype(np.float64)
        present = ~np.isnan(numbers)
        edges = np.asarray(column.edges)
        index = np.clip(np.searchsorted(edges, numbers[present], side="right") - 1, 0, column.size - 1)
        point_bins = np.flatnonzero(edges[:-1] == edges[1:])
        for bin_index in point_bins:  # a point mass's value belongs to its own zero-width bin
            index[numbers[present] == edges[bin_index]] = bin_index
        tokens[present] = column.offset + index
        return tokens
    assert column.categories is not None  # not numeric
    lookup = {category: token for token, category in enumerate(column.categories)}
    for row, value in enumerate(values):
        if _missing(value):
            continue
        text = _text(value)
        if text not in lookup:
            raise DatasetError(f"column {column.name!r}, row {row}: {text!r} is not one of its categories")
        tokens[row] = column.offset + lookup[text]
    return tokens


def _decode_column(column: TableColumn, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    present = tokens != MISSING
    index = tokens[present] - column.offset
    if column.type == "numeric":
        low, high = (bound[index] for bound in _bin_ranges(column))
        drawn = low + rng.random(len(index)) * (high - low + column.integer)
        if column.integer:
            drawn = np.minimum(np.floor(drawn), high)
        numbers = np.full(len(tokens), np.nan)
        numbers[present] = drawn
        return numbers
    out = np.full(len(tokens), None, dtype=object)
    categories = np.asarray(column.categories, dtype=object)
    out[present] = categories[index] if column.type == "categorical" else categories[index] == "true"
    return out


def _bin_ranges(column: TableColumn) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the values each bin of a numeric column holds: its edges, or for a
    whole-number column the whole numbers in it (an inner bin [a, b) stops at b - 1 where b is
    whole; a bin holding none is its rounded midpoint)."""
    edges = np.asarray(column.edges, dtype=np.float64)
    low, high = edges[:-1].copy(), edges[1:].copy()
    if column.integer:
        inner = np.arange(len(low)) < len(low) - 1
        stops_before = inner & (high > low) & (high == np.floor(high))
        low, high = np.ceil(low), np.where(stops_before, high - 1, np.floor(high))
        empty = high < low
        low[empty] = high[empty] = np.round((edges[:-1] + edges[1:]) / 2)[empty]
    return low, high


def _most_frequent(stacked_KN: np.ndarray) -> np.ndarray:
    out = np.empty(stacked_KN.shape[1], dtype=object)
    for row in range(stacked_KN.shape[1]):
        cells = [cell for cell in stacked_KN[:, row].tolist() if cell is not None]
        out[row] = max(set(cells), key=cells.count) if cells else None
    return out


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _text(value) -> str:
    """A category's text: whole floats without their '.0' (a category read as 1.0 is '1')."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    return str(value)
