"""The one bridge between the frozen model dataclasses and ``ml_collections.ConfigDict``.

A recipe keeps each model's fields as a config section, so every field can be set from the command
line (``--config.model.width=64``) and is saved with the run; the model is rebuilt from that
section, or from the JSON a checkpoint saved, by :func:`to_dataclass`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections

T = TypeVar("T")


def section(model: Any) -> ml_collections.ConfigDict:
    """``model`` (a dataclass instance) as a config section.

    A field that is None becomes a placeholder of its annotated type, so it can still be set
    from the command line; tuples stay tuples.
    """
    hints = typing.get_type_hints(type(model))
    fields = ml_collections.ConfigDict()
    for field in dataclasses.fields(model):
        value = getattr(model, field.name)
        if value is None:
            value = ml_collections.config_dict.placeholder(_scalar_type(hints[field.name]))
        fields[field.name] = value
    return fields


def preset_section(cls: type, name: str | None = None, **changes) -> ml_collections.ConfigDict:
    """The section of ``cls.from_name(name, **changes)`` (or ``cls(**changes)`` without a name)."""
    return section(cls.from_name(name, **changes) if name is not None else cls(**changes))


def leave_unset(fields: ml_collections.ConfigDict, names: tuple[str, ...], kind: type) -> None:
    """Marks ``names`` as decided later (by another stage's run), still settable by hand."""
    for name in names:
        fields[name] = ml_collections.config_dict.placeholder(kind)


def settable_like(
    saved: ml_collections.ConfigDict, typed: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """``saved`` (read back from JSON, where an unset field is a plain None, which no override
    can set) with each None field that ``typed`` (its recipe's config) holds as a placeholder
    made that typed placeholder again, in place; returned for chaining."""
    for name, value in saved.items():
        if name not in typed:
            continue
        if isinstance(value, ml_collections.ConfigDict):
            if isinstance(typed[name], ml_collections.ConfigDict):
                settable_like(value, typed[name])
        elif value is None and typed[name] is None:
            kind = typed.get_ref(name).get_type()
            if kind is not type(None):
                saved[name] = ml_collections.config_dict.placeholder(kind)
    return saved


def to_dataclass(cls: type[T], fields: ml_collections.ConfigDict | Mapping[str, Any]) -> T:
    """``cls`` built from a config section or its saved JSON (lists back to tuples).

    Raises:
      ValueError: a field ``cls`` does not have, naming it and the known fields.
    """
    values = fields.to_dict() if isinstance(fields, ml_collections.ConfigDict) else dict(fields)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(known)}")
    return cls(**{name: _coerce(value, hints[name]) for name, value in values.items()})


def _members(hint: Any) -> tuple:
    """The types of a union (``int | None`` -> (int, NoneType)), or ``(hint,)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _scalar_type(hint: Any) -> type:
    """The placeholder type of an optional field: ``float | None`` -> float."""
    for member in _members(hint):
        if member is not type(None):
            origin = typing.get_origin(member)
            return origin or member
    raise TypeError(f"no type in {hint!r}")


def _coerce(value: Any, hint: Any) -> Any:
    """Lists (from JSON or a ConfigDict) to tuples where ``hint`` says tuple, recursively."""
    if not isinstance(value, list | tuple):
        return value
    for member in _members(hint):
        if typing.get_origin(member) is tuple or member is tuple:
            args = typing.get_args(member)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0]) for v in value)
            if args:
                return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
            return tuple(value)
    return value
