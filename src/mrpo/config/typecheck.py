"""A small type checker for the config dataclasses, and the helpers their checks use.

It knows the annotations our fields use: str, int, float (an int is accepted and widened), bool, Literal,
list[...], dict[...], X | None, Any, enums and classes. Every failure is a ``ConfigError`` whose key is
``section.field`` (``loss.beta``); where a section is built under another name (``references.1``), the builder
re-raises it with that prefix (``config.MRPOConfig.from_dict``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import enum
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

from mrpo.errors import ConfigError


def dotted(section: str, name: str) -> str:
    """``loss.beta``; just ``name`` for the top level (section "")."""
    return f"{section}.{name}" if section else name


def matches(value: Any, annotation: Any, *, lenient: bool) -> tuple[bool, Any]:
    """(whether ``value`` fits ``annotation``, the value to store: ints widened to floats, tuples to lists)."""
    if annotation is Any:
        return True, value
    if annotation is None or annotation is type(None):
        return value is None, value
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in arguments:
            fits, converted = matches(value, arm, lenient=lenient)
            if fits:
                return True, converted
        return False, value
    if origin is Literal:
        # `type(...) is` so that True does not pass for 1, nor 1 for 1.0.
        return any(value == allowed and type(value) is type(allowed) for allowed in arguments), value
    if origin is list or annotation is list:
        if not isinstance(value, list | tuple):
            return False, value
        if not arguments:
            return True, list(value)
        items = []
        for item in value:
            fits, converted = matches(item, arguments[0], lenient=lenient)
            if not fits:
                return False, value
            items.append(converted)
        return True, items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            return False, value
        if not arguments:
            return True, value
        key_type, value_type = arguments
        for item_key, item_value in value.items():
            if not (
                matches(item_key, key_type, lenient=lenient)[0]
                and matches(item_value, value_type, lenient=lenient)[0]
            ):
                return False, value
        return True, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return True, value
        if issubclass(annotation, enum.Enum):
            return value in {member.value for member in annotation}, value
        return lenient, value
    # An annotation this checker does not know (only in transformers' TrainingArguments): let transformers judge.
    return lenient, value


_PLAIN_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "a mapping",
}
_PLURAL_NAMES = {str: "strings", int: "integers", float: "numbers", bool: "booleans", dict: "mappings"}


def describe(annotation: Any) -> str:
    """What a value of ``annotation`` looks like, in words: ``'adaptive' or a list of numbers``."""
    if annotation is None or annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        arms = [arm for arm in arguments if arm is not type(None)]
        described = " or ".join(describe(arm) for arm in arms)
        return described + (" or null" if len(arms) < len(arguments) else "")
    if origin is Literal:
        if len(arguments) == 1:
            return repr(arguments[0])
        return "one of " + ", ".join(repr(allowed) for allowed in arguments)
    if origin is list or annotation is list:
        if not arguments:
            return "a list"
        item = arguments[0]
        if item in _PLURAL_NAMES:
            return f"a list of {_PLURAL_NAMES[item]}"
        if isinstance(item, type) and not issubclass(item, enum.Enum):
            return f"a list of {item.__name__}s"
        return f"a list of items that are each {describe(item)}"
    if origin is dict:
        return "a mapping"
    if annotation in _PLAIN_NAMES:
        return _PLAIN_NAMES[annotation]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    if isinstance(annotation, type):
        return f"a {annotation.__name__}"
    return str(annotation)


def literal_choices(annotation: Any) -> list[str]:
    """Every string a Literal (or enum) inside ``annotation`` allows, for did-you-mean suggestions."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return [allowed for allowed in typing.get_args(annotation) if isinstance(allowed, str)]
    if origin in (typing.Union, types.UnionType):
        return [choice for arm in typing.get_args(annotation) for choice in literal_choices(arm)]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    return []


def did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    """`` — did you mean 'loss.beta'?`` for the candidate closest to ``word`` (shown under ``prefix``), or ""."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" — did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""


def conform(value: Any, annotation: Any, key: str, *, lenient: bool = False) -> Any:
    """``value`` as stored for ``annotation``, or a ConfigError naming ``key``, the value and what is allowed."""
    fits, converted = matches(value, annotation, lenient=lenient)
    if fits:
        return converted
    hint = did_you_mean(value, literal_choices(annotation)) if isinstance(value, str) else ""
    raise ConfigError(f"'{key}' must be {describe(annotation)}, got {value!r}{hint}", key=key)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field_types(config: Any, section: str) -> None:
    """Check every field of a dataclass against its annotation (storing widened values) — the first step of
    each section's ``__post_init__``."""
    hints = type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        conformed = conform(value, hints[field.name], dotted(section, field.name))
        if conformed is not value:
            object.__setattr__(config, field.name, conformed)


def fail(section: str, name: str, value: Any, requirement: str) -> typing.NoReturn:
    key = dotted(section, name)
    raise ConfigError(f"'{key}' {requirement}, got {value!r}", key=key)


def require_text(config: Any, section: str, name: str) -> None:
    value = getattr(config, name)
    if value is not None and not value.strip():
        fail(section, name, value, "must not be empty")


def require_at_least(config: Any, section: str, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if value is not None and value < minimum:
        fail(section, name, value, f"must be at least {minimum}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a config dataclass, by field name (for help texts and errors)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # source not shipped (zipapp, frozen build)
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for statement, following in zip(body, body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs
