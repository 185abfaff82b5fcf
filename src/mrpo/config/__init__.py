"""The run's configuration: one typed schema read from YAML, ``key=value`` overrides and the Python API alike.

Homes: ``schema`` (the sections ``policy``, ``references``, ``data``, ``loss``, ``lora``, ``training``,
``diagnostics``; ``MRPOConfig``, ``load_config``), ``overrides`` (the YAML dialect and ``key=value``),
``typecheck`` (field types and their messages), ``training`` (the ``training`` section checked against
``TrainingArguments`` without building one), ``docs`` (docs/config.md and ``mrpo defaults`` from the field docs).
It imports nothing of ``mrpo`` but ``mrpo.errors``. The face names the two that every caller needs, imported on
first use.
"""

from typing import Any

__all__ = ["MRPOConfig", "load_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mrpo.config import schema

        return getattr(schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
