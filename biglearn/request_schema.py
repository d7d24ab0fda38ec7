"""The JSON Schema of the completion requests one model accepts, as the server publishes it.

`CompleteRequest` describes every kind of model at once (token ids, patches, table cells). The
schema here is narrowed to one export and one server's limits: its positions, vocabulary,
columns, categories, PNG size, and the most samples and steps a request may ask for. A request
is valid under it exactly when `parse_request` accepts it, so a client (or a fuzzer) reading
the OpenAPI document learns the real contract.

Two rules sit outside JSON Schema and hold by construction instead: a position both given and
listed as a target keeps its given value, and target "rest" with every position given returns
the given values.
"""

from __future__ import annotations

import re
from typing import Any, get_args

from biglearn.data.table import TableColumn
from biglearn.generation import MAX_GUIDANCE, Order
from biglearn.serving import MAX_SEED, ExportedModel, ServingConfig

PNG_FORMAT = "png-base64"
"""The `format` of PNG strings: base64 of a greyscale PNG of the model's height x width."""

NULL: dict[str, Any] = {"type": "null"}
WHOLE_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)")


def request_schema(served: ExportedModel, cfg: ServingConfig) -> dict[str, Any]:
    """JSON Schema (draft 2020 and later, as OpenAPI 3.1 uses it) of a POST /v1/complete body for this model."""
    if served.table is not None:
        values, target = _table_fields(served.table.columns)
        image = NULL
    else:
        values, target = _position_fields(served)
        image = _image_field(served)
    properties: dict[str, Any] = {
        "values": values,
        "image": image,
        "target": target,
        "num_samples": {"type": "integer", "minimum": 1, "maximum": _most_samples(served, cfg, passes=1)},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
        "return_png": {"type": "boolean"} if served.image_shape else {"const": False},
    }
    properties |= _decoding_fields(served, cfg)
    schema: dict[str, Any] = {
        "title": "CompleteRequest",
        "description": "Known values (`values`, or `image` for an image model), the target positions, "
        "and how to decode. A position both given and a target keeps its given value.",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "examples": [_example(served)],
    }
    if served.image_shape:
        schema["not"] = {
            "required": ["values", "image"],
            "properties": {"values": {"not": NULL}, "image": {"not": NULL}},
        }
    guided = _guidance_bound(served, cfg)
    if guided:
        schema |= guided
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, NULL]}


def _position_fields(served: ExportedModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """`values` and `target` of a token model or a generator: by position."""
    length = served.spec.length
    if served.spec.continuous:
        patch_dim = served.spec.patch_dim or 1
        patch = {"type": "array", "items": {"type": "number"}, "minItems": patch_dim, "maxItems": patch_dim}
        value = {"anyOf": [{"type": "number"}, patch]} if patch_dim == 1 else patch
    else:
        value = {"type": "integer", "minimum": 0, "maximum": served.vocab_size - 1}
    full = {"type": "array", "items": _nullable(value), "minItems": length, "maxItems": length}
    by_position = {
        "type": "object",
        "propertyNames": {"pattern": position_pattern(length)},
        "additionalProperties": _nullable(value),
    }
    values = {
        "anyOf": [full, by_position, NULL],
        "description": f"a list of {length} values (null = unknown) or {{position: value}}; positions 0..{length - 1}",
    }
    positions = {"type": "integer", "minimum": 0, "maximum": length - 1}
    target = {"anyOf": [{"const": "rest"}, {"type": "array", "items": positions, "uniqueItems": True, "minItems": 1}]}
    return values, target


def _table_fields(columns: list[TableColumn]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`values` and `target` of a table model: by column name."""
    values = {
        "anyOf": [
            {
                "type": "object",
                "properties": {column.name: _nullable(_cell(column)) for column in columns},
                "additionalProperties": False,
            },
            NULL,
        ],
        "description": "{column: value}; null = unknown",
    }
    names = {"enum": [column.name for column in columns]}
    target = {"anyOf": [{"const": "rest"}, {"type": "array", "items": names, "uniqueItems": True, "minItems": 1}]}
    return values, target


def _cell(column: TableColumn) -> dict[str, Any]:
    if column.type == "numeric":
        return {"type": "number"}
    if column.type == "boolean":
        return {"type": "boolean"}
    categories = list(column.categories or [])
    # A category that reads as a whole number may also be sent as that number.
    return {"enum": categories + [int(c) for c in categories if WHOLE_NUMBER.fullmatch(c)]}


def _image_field(served: ExportedModel) -> dict[str, Any]:
    if not served.image_shape:
        return NULL
    height, width = served.image_shape
    png = {"type": "string", "format": PNG_FORMAT, "contentEncoding": "base64", "contentMediaType": "image/png"}
    image = {
        "type": "object",
        "properties": {
            "png": png | {"description": f"base64 PNG, greyscale, {height} x {width}"},
            "mask": _nullable(png | {"description": "white (>= 128) = known pixel; null: all known"}),
        },
        "required": ["png"],
        "additionalProperties": False,
    }
    return _nullable(image)


def _decoding_fields(served: ExportedModel, cfg: ServingConfig) -> dict[str, Any]:
    """A token model's decoding settings; a generator draws in one pass and takes none."""
    if served.spec.continuous:
        return dict.fromkeys(("steps", "order", "temperature", "top_k", "guidance"), NULL)
    return {
        "steps": _nullable({"type": "integer", "minimum": 1, "maximum": cfg.limits.max_steps}),
        "order": _nullable({"enum": list(get_args(Order))}),
        "temperature": _nullable({"type": "number", "minimum": 0}),
        "top_k": _nullable({"type": "integer", "minimum": 1}),
        "guidance": _nullable({"type": "number", "minimum": 0, "maximum": MAX_GUIDANCE}),
    }


def _most_samples(served: ExportedModel, cfg: ServingConfig, passes: int) -> int:
    """num_samples' bound: the limit, and num_samples * length * passes <= max_tokens_per_request."""
    return min(cfg.limits.max_num_samples, cfg.limits.max_tokens_per_request // (served.spec.length * passes))


def _guidance_bound(served: ExportedModel, cfg: ServingConfig) -> dict[str, Any]:
    """if/then/else on num_samples where guidance (which decodes twice) lowers its bound."""
    unguided, guided = _most_samples(served, cfg, 1), _most_samples(served, cfg, 2)
    if served.spec.continuous or guided == unguided:
        return {}
    if cfg.decoding.guidance > 0:  # guided unless a request sets guidance to 0
        given = {"const": 0}
        if_given, otherwise = unguided, guided
    else:
        given = {"type": "number", "exclusiveMinimum": 0}
        if_given, otherwise = guided, unguided
    return {
        "if": {"required": ["guidance"], "properties": {"guidance": given}},
        "then": {"properties": {"num_samples": {"maximum": if_given}}},
        "else": {"properties": {"num_samples": {"maximum": otherwise}}},
    }


def _example(served: ExportedModel) -> dict[str, Any]:
    if served.table is not None:
        first = served.table.columns[0]
        cell: Any = True  # boolean
        if first.type == "numeric":
            cell = (first.edges or [0.0])[0]
        elif first.type == "categorical":
            cell = (first.categories or [""])[0]
        return {"values": {first.name: cell}, "target": "rest", "num_samples": 1, "seed": 7}
    known = [0.0] * (served.spec.patch_dim or 1) if served.spec.continuous else 0
    return {"values": {"0": known}, "target": "rest", "num_samples": 1, "seed": 7}


def position_pattern(length: int) -> str:
    """A regular expression for the whole numbers 0..length-1 written without leading zeros."""
    top = str(length - 1)
    shorter = ["[0-9]"] + [f"[1-9][0-9]{{{n - 1}}}" for n in range(2, len(top))]
    same_length = []
    for i, digit in enumerate(top):
        lowest = 1 if i == 0 and len(top) > 1 else 0
        if int(digit) > lowest:
            rest = len(top) - i - 1
            same_length.append(f"{top[:i]}[{lowest}-{int(digit) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    same_length.append(top)
    alternatives = (shorter if len(top) > 1 else []) + same_length
    return "^(" + "|".join(alternatives) + ")$"
