"""Reading a command line in one pass: the command's own options, the config file, ``key=value`` overrides and
TRL-style ``--flag value`` options, each told apart token by token, so that argparse (a ``CommandParser``, which
knows the command's own options) reads only those options and the config path.

A TRL-style flag names a config key by its bare name (``--beta 0.2`` is ``loss.beta=0.2``, ``--learning_rate
1e-6`` is ``training.learning_rate=1e-6``) or by its dotted key (``--loss.eps=0.3``). A name the references share
with the policy or data section means the policy's or data's key, as it does in TRL (``--max_length`` is
``data.max_length``, ``--dtype`` is ``policy.dtype``); a reference's own is set by its dotted key
(``references.1.max_length=512``). A switch (a key whose type is a bool) given bare is true and leaves the next
token alone (``--gradient_checkpointing --max_steps 3``); ``--gradient_checkpointing false`` still sets it false.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mrpo.config.overrides import parse_yaml
from mrpo.config.schema import (
    DataConfig,
    DiagnosticsConfig,
    LoraConfig,
    LossConfig,
    PolicyConfig,
    ReferenceConfig,
)
from mrpo.config.training import training_argument_names, training_argument_types
from mrpo.config.typecheck import did_you_mean, field_docs
from mrpo.errors import ConfigError

SECTIONS: Mapping[str, type] = {
    "policy": PolicyConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "lora": LoraConfig,
    "diagnostics": DiagnosticsConfig,
}
"""The sections a bare flag name is looked up in (besides the references and training)."""

Nargs = int | str | None
"""How many values an option takes, as argparse says it (None: one; "?", "*", "+"; 0 for a switch)."""


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that keeps the option strings it takes with their nargs (``options``) and its subcommands
    by name (``commands``), so that ``read_command_line`` can sort a command's line for it without argparse's private
    tables. Its subcommands' parsers are CommandParsers too (argparse makes them of the parent's class)."""

    def __init__(self, *args, **kwargs):
        self.options: dict[str, Nargs] = {}
        self.commands: Mapping[str, CommandParser] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.options.update(dict.fromkeys(action.option_strings, action.nargs))
        return action

    def add_subparsers(self, **kwargs):
        subparsers = super().add_subparsers(**kwargs)
        self.commands = subparsers.choices  # filled as the subcommands are added
        return subparsers


@dataclasses.dataclass
class CommandLine:
    """A command's arguments, sorted: what argparse reads, and the overrides it never sees."""

    arguments: list[str]
    """The command's own options with their values, and the config path: for argparse."""
    overrides: list[str]
    """Dotted ``key=value`` overrides, in the order given (TRL-style flags rewritten)."""
    notes: list[str]
    """One line per TRL-style flag: what it was read as."""


def read_command_line(options: Mapping[str, Nargs], argv: Sequence[str]) -> CommandLine:
    """Sort ``argv`` (after the command name) in one pass; ``options`` maps each option string the command itself
    takes to its nargs (``CommandParser.options``). Overrides may stand anywhere, even after or glued to an option
    with an optional value (``--resume loss.beta=0.5``, ``--resume=loss.beta=0.5``: ``--resume`` bare)."""
    line = CommandLine([], [], [])
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        option = token.split("=")[0]
        if token.startswith("-") and option in options:
            value = token.partition("=")[2]
            if options[option] == "?" and is_override(value):  # `--resume=loss.beta=0.5`: the option bare
                line.arguments.append(option)
                line.overrides.append(value)
            else:
                line.arguments.append(token)
            if "=" not in token:
                values = _option_values(options[option], argv[index:])
                line.arguments += values
                index += len(values)
        elif token.startswith("--") and len(token) > 2:
            override, consumed = _flag(token, argv[index] if index < len(argv) else None)
            index += consumed
            line.overrides.append(override)
            line.notes.append(f"{token.split('=')[0]} {override.partition('=')[2]} read as {override}")
        elif is_override(token):
            line.overrides.append(token)
        else:
            line.arguments.append(token)
    return line


def is_override(token: str) -> bool:
    """``loss.beta=0.2`` (not an option, nor an existing file whose name holds an "=")."""
    return "=" in token and not token.startswith("-") and not Path(token).exists()


def _option_values(nargs: Nargs, following: Sequence[str]) -> list[str]:
    """The values an option of the command takes from the tokens after it. One required value is taken whatever it
    looks like (``--checkpoint dpo=/path``); optional and repeated values stop at an option or an override."""
    if nargs == 0:
        return []
    if nargs is None:
        return list(following[:1]) if following and not following[0].startswith("-") else []
    if isinstance(nargs, int):
        return list(following[:nargs])
    taken = []
    for token in following:
        if token.startswith("-") or is_override(token) or (nargs == "?" and taken):
            break
        taken.append(token)
    return taken


def _flag(token: str, following: str | None) -> tuple[str, int]:
    """A TRL-style flag as an override, and how many of the tokens after it it took as its value (0 or 1)."""
    name, has_value, value = token[2:].partition("=")
    keys = keys_named(name.replace("-", "_"))
    if len(keys) != 1:
        where = (
            f"it could be {' or '.join(keys)}: write the one you mean as KEY=VALUE"
            if keys
            else f"no config key is called {name!r}{did_you_mean(name, all_key_names())}"
        )
        raise ConfigError(f"option --{name}: {where}", key=name)
    key = keys[0]
    if has_value:
        return f"{key}={value}", 0
    if is_switch(key):
        takes_next = following is not None and isinstance(_yaml_or_none(following), bool)
        return f"{key}={following if takes_next else 'true'}", int(takes_next)
    if following is None or following.startswith("--"):
        raise ConfigError(f"option --{name} needs a value: --{name} VALUE (or {key}=VALUE)", key=key)
    return f"{key}={following}", 1


def _yaml_or_none(text: str) -> Any:
    try:
        return parse_yaml(text)
    except Exception:  # not YAML: certainly not a bool
        return None


def keys_named(name: str) -> list[str]:
    """The dotted keys a bare option name can mean (``beta`` -> ``["loss.beta"]``; ``seed`` -> data and
    training). A reference's field is meant only when no other section has that name. A name with a dot is a key
    already."""
    if "." in name:
        return [name]
    found = [f"{section}.{name}" for section, cls in SECTIONS.items() if name in field_docs(cls)]
    if name == "cache_dir":
        found.append(name)
    if name in training_argument_names():
        found.append(f"training.{name}")
    if not found and name in field_docs(ReferenceConfig) and name != "name":
        found.append(f"references.0.{name}")
    return found


def all_key_names() -> list[str]:
    """Every bare option name ``keys_named`` knows, for did-you-mean suggestions."""
    names = {"cache_dir", *training_argument_names()}
    for cls in (*SECTIONS.values(), ReferenceConfig):
        names.update(field_docs(cls))
    return sorted(names)


def is_switch(key: str) -> bool:
    """Whether a dotted key's value may be a bool (``training.gradient_checkpointing``, ``lora.enabled``,
    ``policy.padding_free``), so that the flag given bare means true."""
    section, _, rest = key.partition(".")
    if section == "training":
        annotation = training_argument_types().get(rest)
    elif section == "references":
        annotation = typing.get_type_hints(ReferenceConfig).get(rest.partition(".")[2])
    elif section in SECTIONS:
        annotation = typing.get_type_hints(SECTIONS[section]).get(rest)
    else:
        return False
    return annotation is bool or bool in typing.get_args(annotation)
