"""Typed configuration: one pydantic model per job, loaded from YAML with `--set a.b=value`.

Every config class derives from `Config` (frozen, unknown keys rejected; a field's docstring is
its description). `load_config` turns pydantic's validation errors into one `ConfigError` whose
message says which key was wrong, what it got, and (for unknown keys) which keys are valid there.
A config file is a path or the name of a recipe shipped in `biglearn/recipes/`.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails, to_jsonable_python

C = TypeVar("C", bound="Config")


RECIPES = Path(__file__).with_name("recipes")
FIRST_SENTENCE = re.compile(r"(?<!e\.g)(?<!i\.e)\.\s")  # where a docstring's first sentence ends


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, use_attribute_docstrings=True)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `data` with each `a.b.c=value` applied (value parsed as YAML)."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. train.steps=100), got {item!r}")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' holds a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def recipe_names() -> list[str]:
    """The recipes shipped with the package, by the name `--config` takes."""
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A config file: the path itself when it is a file, else the packaged recipe of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipe = RECIPES / f"{name_or_path}.yaml"
    if path.suffix == "" and path.name == str(name_or_path) and recipe.is_file():
        return recipe
    raise ConfigError(
        f"config {str(name_or_path)!r} is neither a file nor a packaged recipe; recipes: {', '.join(recipe_names())}"
    )


def config_keys(cls: type[Config], recipe: str | Path | None = None) -> str:
    """Every key of `cls` as `section.key = value  description` lines (for --help): the values
    `recipe` sets, or the defaults of `cls` where there is no recipe."""
    values = load_config(cls, recipe).model_dump(mode="json") if recipe is not None else None
    source = f"values: recipe {recipe}" if recipe is not None else "values: defaults"
    lines = [f"{cls.__name__} keys ({source}; set with --set KEY=VALUE, values are YAML):"]
    width = 38
    for key, value, description in config_entries(cls, values):
        lines.append(f"  {f'{key} = {value}':<{width}} {description}".rstrip())
    return "\n".join(lines)


def config_entries(cls: type[BaseModel], values: dict[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """(dotted key, value as YAML, first sentence of its docstring) of every key of `cls`; values
    from `values` (a dumped config) where it has them, else the defaults."""
    return list(_walk(cls, "", values))


def _walk(
    cls: type[BaseModel], prefix: str, values: dict[str, Any] | None = None
) -> typing.Iterator[tuple[str, str, str]]:
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        annotation = _unwrap(field.annotation)
        given = values.get(name) if isinstance(values, dict) else None
        summary = FIRST_SENTENCE.split(" ".join((field.description or "").split()))[0].rstrip(".")
        summary = summary[:100] + ("..." if len(summary) > 100 else "")
        members = _variants(annotation)
        if members:  # a discriminated union (e.g. a dataset source): each variant's own keys
            kinds = {variant: typing.get_args(variant.model_fields["kind"].annotation)[0] for variant in members}
            chosen = given.get("kind") if isinstance(given, dict) else None
            yield f"{key}.kind", _shown(chosen) if chosen else "(required)", f"one of: {', '.join(kinds.values())}"
            for variant, kind in kinds.items():
                for sub_key, value, description in _walk(variant, f"{key}.", given if chosen == kind else None):
                    if sub_key != f"{key}.kind":
                        yield sub_key, value, f"[{kind}] {description}".rstrip()
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and field.default is not None:
            yield from _walk(annotation, f"{key}.", given if isinstance(given, dict) else None)
            continue
        if isinstance(values, dict) and name in values:
            shown = _shown(given)
        elif field.is_required():
            shown = "(required)"
        else:
            shown = _shown(to_jsonable_python(field.get_default(call_default_factory=True)))
        yield key, shown, summary


def _variants(annotation: Any) -> list[type[BaseModel]]:
    """The models of a union of several models (a discriminated union), else []."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return []
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields]
    return models if len(models) > 1 and len(models) == len(members) else []


def _shown(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
    return text if len(text) <= 60 else text[:57] + "..."


def job_parser(
    description: str,
    config_help: str,
    set_example: str,
    default_config: str | None = None,
    config_class: type[Config] | None = None,
    prog: str | None = None,
) -> argparse.ArgumentParser:
    """The command line every job starts from: `--config` (a YAML path or a recipe name), repeated
    `--set KEY=VALUE` and `--print-config`; `--help` lists `config_class`'s keys."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_keys(config_class, default_config) if config_class is not None else None,
    )
    parser.add_argument("--config", default=default_config, help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override, e.g. {set_example}")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return parser


def config_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML (what --print-config shows)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Builds `cls` from a YAML file or recipe name (optional) plus `--set` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = config_path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections at the top level")
        data = loaded or {}
        source = str(path)
    data = apply_overrides(data, list(overrides))
    return validate_config(cls, data, source)


def validate_config(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(cls, err) for err in exc.errors()]
        raise ConfigError(f"invalid {cls.__name__} ({source}):\n  - " + "\n  - ".join(problems)) from None


def _describe(cls: type[BaseModel], err: ErrorDetails) -> str:
    loc = [str(part) for part in err["loc"]]
    key = ".".join(loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(cls, loc[:-1])
        hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
        return f"unknown key '{key}'{hint}"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {err['msg']}{shown}"


def _valid_keys(cls: type[BaseModel], loc: list[str]) -> list[str]:
    node: Any = cls
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(part)
            if field is None:
                return []
            node = field.annotation
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return []
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return sorted(node.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / X | None -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
