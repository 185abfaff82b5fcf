"""The ``training`` section of a config: keyword arguments of ``transformers.TrainingArguments``, checked against
its fields without building one (so a mistyped key fails before minutes of loading), with mrpo's defaults."""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from mrpo.config.typecheck import conform, did_you_mean
from mrpo.errors import ConfigError


@functools.cache
def training_argument_types() -> dict[str, Any]:
    """TrainingArguments' constructor fields and their annotations (imports transformers, without building one).
    Cached: copy it before changing it."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {
        field.name: hints.get(field.name, Any)
        for field in dataclasses.fields(TrainingArguments)
        if field.init
    }


_RENAMED_TRAINING_ARGUMENTS = {
    # transformers >= 5.2x renamed these; both names are accepted in configs and mapped to what is installed.
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _current_argument_names(arguments: dict[str, Any]) -> dict[str, Any]:
    """Rename arguments to the names the installed TrainingArguments uses, so no version warns or fails."""
    allowed = training_argument_types()
    renamed = dict(arguments)
    for old, new in _RENAMED_TRAINING_ARGUMENTS.items():
        if new in allowed and old in renamed and new not in renamed:
            renamed[new] = renamed.pop(old)
        elif new not in allowed and new in renamed and old not in renamed:
            renamed[old] = renamed.pop(new)
    return renamed


class TrainingConfig(Mapping[str, Any]):
    """Keyword arguments of ``transformers.TrainingArguments``, with our defaults merged in.

    Keys and value types are checked against TrainingArguments' fields on construction, without building one;
    ``to_training_arguments()`` builds it. ``resume_from_checkpoint`` is kept here but not passed on: it is an
    argument of ``Trainer.train``.
    """

    DEFAULTS: typing.ClassVar[Mapping[str, Any]] = types.MappingProxyType(
        {
            "output_dir": "runs/mrpo",
            # TRL's DPOConfig default, what a preference-optimisation user expects (transformers' own 5e-5 is 50x
            # larger). For full fine-tuning; with LoRA the default is MRPOConfig's LORA_LEARNING_RATE.
            "learning_rate": 1e-6,
            "report_to": "none",
            "logging_steps": 10,
            "remove_unused_columns": False,  # the MRPO collator needs the pair columns
            # The loss already stops on a non-finite log-prob (a TrainingError); Trainer's filter would add a second
            # host-device sync to every step only to hide a NaN loss from the log.
            "logging_nan_inf_filter": False,
            "seed": 0,
        }
    )

    def __init__(self, arguments: Mapping[str, Any] | None = None, /, **keyword_arguments: Any):
        merged = {**self.DEFAULTS, **(arguments or {}), **keyword_arguments}
        allowed = dict(training_argument_types())
        for old_name, new_name in _RENAMED_TRAINING_ARGUMENTS.items():  # either name, whichever is installed
            if (old_name in allowed) != (new_name in allowed):
                allowed.setdefault(old_name, allowed.get(new_name))
                allowed.setdefault(new_name, allowed.get(old_name))
        for key, value in merged.items():
            name = f"training.{key}"
            if not isinstance(key, str) or key not in allowed:
                raise ConfigError(
                    f"unknown key '{name}'{did_you_mean(str(key), allowed, 'training')} — the 'training' section "
                    "takes the arguments of transformers.TrainingArguments",
                    key=name,
                )
            annotation = bool | str | None if key == "resume_from_checkpoint" else allowed[key]
            conform(value, annotation, name, lenient=True)  # checked, but stored as written: 10 stays 10
        if merged["remove_unused_columns"]:
            raise ConfigError(
                "'training.remove_unused_columns' must stay false, got True: the MRPO collator needs the pair "
                "columns that Trainer would remove",
                key="training.remove_unused_columns",
            )
        self._arguments = merged
        self._given = frozenset({**(arguments or {}), **keyword_arguments})

    @classmethod
    def unchecked(cls, arguments: Mapping[str, Any]) -> TrainingConfig:
        """The section with the defaults merged in but its keys not checked against TrainingArguments, for commands
        that never train (``mrpo inspect``): the check imports transformers' training stack, seconds on a CPU.
        ``to_training_arguments`` still rejects an unknown key."""
        section = cls.__new__(cls)
        section._arguments = {**cls.DEFAULTS, **arguments}
        section._given = frozenset(arguments)
        return section

    def with_defaults(self, defaults: Mapping[str, Any]) -> TrainingConfig:
        """The same section with other defaults for the keys it was not given (a given key keeps its value)."""
        section = TrainingConfig.__new__(TrainingConfig)
        section._given = self._given
        section._arguments = {
            **self._arguments,
            **{k: v for k, v in defaults.items() if k not in self._given},
        }
        return section

    def __getitem__(self, key: str) -> Any:
        return self._arguments[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arguments)

    def __len__(self) -> int:
        return len(self._arguments)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TrainingConfig):
            return self._arguments == other._arguments
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TrainingConfig({self._arguments!r})"

    @property
    def output_dir(self) -> str:
        """Where checkpoints, metrics and the resolved config of the run go."""
        return self._arguments["output_dir"]

    @property
    def resume_from_checkpoint(self) -> str | bool | None:
        """Checkpoint to resume from, for ``Trainer.train``: a path, true (the latest in output_dir) or None."""
        return self._arguments.get("resume_from_checkpoint")

    @property
    def eval_strategy(self) -> str:
        """When to evaluate during training: "no", "steps" or "epoch"."""
        strategy = self._arguments.get("eval_strategy", "no")
        return str(getattr(strategy, "value", strategy))

    def to_dict(self) -> dict[str, Any]:
        return dict(self._arguments)

    def to_training_arguments(self) -> Any:
        """A ``transformers.TrainingArguments`` built from this section (without ``resume_from_checkpoint``)."""
        from transformers import TrainingArguments

        arguments = {key: value for key, value in self._arguments.items() if key != "resume_from_checkpoint"}
        arguments = _current_argument_names(arguments)
        try:
            return TrainingArguments(**arguments)
        except TypeError as error:
            unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error))
            if not unexpected:
                raise
            key = unexpected.group(1)
            raise ConfigError(
                f"unknown key 'training.{key}'{did_you_mean(key, training_argument_types(), 'training')} — this"
                " version of transformers.TrainingArguments does not take it",
                key=f"training.{key}",
            ) from None
        except ValueError as error:
            raise ConfigError(
                f"transformers.TrainingArguments rejected the 'training' section: {error}"
            ) from None


RECORDED_TRAINING_ARGUMENTS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "seed",
    "bf16",
    "fp16",
)
"""The training arguments that decide what a run computes: recorded with their effective values (defaults
included) in the saved config, and compared when a run is resumed."""


def effective_training_arguments(arguments: Any) -> dict[str, Any]:
    """The values ``RECORDED_TRAINING_ARGUMENTS`` actually have in a built ``TrainingArguments`` (plain YAML types)."""
    effective = {}
    for name in RECORDED_TRAINING_ARGUMENTS:
        if hasattr(arguments, name):
            value = getattr(arguments, name)
            effective[name] = getattr(value, "value", value)  # enums (scheduler, optimizer) as their strings
    return effective


def training_argument_names() -> list[str]:
    """Every key the training section takes (the installed TrainingArguments' fields, either name of a renamed
    one)."""
    names = set(training_argument_types()) | {"resume_from_checkpoint"}
    for old, new in _RENAMED_TRAINING_ARGUMENTS.items():
        if old in names or new in names:
            names |= {old, new}
    return sorted(names)
