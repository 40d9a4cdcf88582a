"""Command-line flags generated from a pydantic settings model, so every app's CLI and its environment variables
name the same fields (``--batch-size`` <-> ``batch_size`` <-> ``INDEXER_BATCH_SIZE``).

Nested models become ``--outer-inner`` flags (``--rate-limit-per-second``) unless ``rename`` gives them a shorter
name (``{"encoder.name": "encoder"}``). Only flags the user gave override the environment and the defaults.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr


def _field_type(annotation: Any) -> tuple[Any, list[Any] | None]:
    """argparse ``type`` and ``choices`` for a simple annotation (Literal, optional scalars, Path)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return type(args[0]), list(args)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _field_type(args[0])
    return annotation, None


def _leaves(model: type[BaseModel], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted name, FieldInfo) of every scalar field, nested models flattened."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaves(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _dest(dotted: str) -> str:
    return "cfg__" + dotted.replace(".", "__")


def add_settings_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    skip: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per scalar field of ``model`` (list and secret fields are left to the environment)."""
    skipped = set(skip)
    rename = rename or {}
    for dotted, field in _leaves(model):
        if dotted in skipped or dotted.split(".")[0] in skipped:
            continue
        typ, choices = _field_type(field.annotation)
        if typing.get_origin(typ) in (list, dict) or typ in (list, dict, SecretStr):
            continue
        flag = "--" + rename.get(dotted, dotted.replace(".", "-").replace("_", "-"))
        default = field.default if field.default_factory is None else None
        help_ = f"{field.description or ''} (default: {default!r})".strip()
        if typ is bool:
            parser.add_argument(flag, dest=_dest(dotted), action=argparse.BooleanOptionalAction, default=None,
                                help=help_)
        else:
            parser.add_argument(flag, dest=_dest(dotted), type=Path if typ is Path else typ, choices=choices,
                                default=None, help=help_)


def given_flags(ns: argparse.Namespace) -> dict[str, Any]:
    """The values of the generated flags the user gave, as a nested dict (``{"encoder": {"name": ...}}``)."""
    out: dict[str, Any] = {}
    for dest, value in vars(ns).items():
        if not dest.startswith("cfg__") or value is None:
            continue
        *outer, leaf = dest[len("cfg__"):].split("__")
        node = out
        for part in outer:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


M = typing.TypeVar("M", bound=BaseModel)


def settings_from_flags(model: type[M], ns: argparse.Namespace, **extra: Any) -> M:
    """``model()`` (environment, then defaults) with the given flags, then ``extra``, on top."""
    base = model().model_dump()
    return model.model_validate(_merge(_merge(base, given_flags(ns)), extra))
