"""Reading config text: the YAML dialect of config files and ``key=value`` overrides from the command line.

Values are YAML: ``1e-5`` is a number, only ``true``/``false`` are booleans (``eval_strategy: no`` stays the
string "no"), a key written twice in one mapping is an error, an empty value is None. An override addresses list
items by position (``references.1.dtype``) or, for references, by name (``references.gemma.dtype``); one past
the end appends an item.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from mrpo.config.typecheck import did_you_mean
from mrpo.errors import ConfigError

INITIALISING_REFERENCE_NAME = "init"
"""The name of the reference a config that lists none gets: the policy's starting model."""


class _ConfigLoader(yaml.SafeLoader):
    """YAML safe loader: 1e-5 is a number (YAML 1.1 wants 1.0e-5), only true/false are booleans (not no/on/off),
    and a key written twice in one mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(
                    f"key {key!r} appears twice in one mapping ({key_node.start_mark}); keep one"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads yes/no/on/off as booleans, so `eval_strategy: no` would become False. Only true/false are
# booleans here (as in YAML 1.2): rebuild the resolver table without the 1.1 bool resolver, then add 1.2's.
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: no arbitrary objects


def parse_override(override: str) -> tuple[str, Any]:
    """``"loss.beta=0.2"`` -> ``("loss.beta", 0.2)``; the value is parsed as YAML, an empty value is None."""
    key, separator, text = override.partition("=")
    key = key.strip()
    if not separator or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. loss.beta=0.2")
    try:
        value = parse_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({error})", key=key) from None
    return key, value


def apply_override(root: dict[str, Any], key: str, value: Any) -> str:
    """Set ``key`` to ``value`` in the raw config; returns the key with list items by position
    (``references.gemma.dtype`` -> ``references.1.dtype``), the form error messages use."""
    parts = key.split(".")
    if parts[0] == "references" and len(parts) > 1 and root.get("references") is None:
        # Overriding one reference of a config that lists none: start from the default list (the policy's model).
        policy = root.get("policy") if isinstance(root.get("policy"), Mapping) else {}
        default = {"name": INITIALISING_REFERENCE_NAME, "model": policy.get("model")}
        default.update({name: policy[name] for name in ("tokenizer", "dtype") if name in policy})
        root["references"] = [default]
    node: Any = root
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, here)
            parts[depth] = str(index)
            if index == len(
                node
            ):  # one past the end appends, so a reference can be added from the command line
                node.append({} if not last else value)
            elif last:
                node[index] = value
            if not last:
                node = node[index]
            continue
        if not isinstance(node, dict):
            parent = ".".join(parts[:depth])
            raise ConfigError(
                f"override '{key}': '{parent}' is {node!r}, not a section with keys", key=parent
            )
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    return ".".join(parts)


def _list_index(items: list[Any], part: str, here: str) -> int:
    if part.isdigit():
        index = int(part)
        if index > len(items):
            raise ConfigError(
                f"'{here}': there are {len(items)} items (0 to {len(items) - 1}); {index} is out of range",
                key=here,
            )
        return index
    names = [item.get("name") for item in items if isinstance(item, Mapping)]
    if part in names:
        return names.index(part)
    raise ConfigError(
        f"'{here}': no item named {part!r}{did_you_mean(part, [n for n in names if isinstance(n, str)])}; use a"
        f" position (0 to {len(items) - 1}) or one of the names {names}",
        key=here,
    )


def source_of(key: str | None, overrides: list[tuple[str, str]]) -> str | None:
    """The last override that set ``key`` (or a section holding it, or a key inside it), if any."""
    if key is None:
        return None
    for text, override_key in reversed(overrides):
        if override_key == key or key.startswith(override_key + ".") or override_key.startswith(key + "."):
            return text
    return None
