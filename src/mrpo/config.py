"""The typed configuration of an MRPO run: one schema for the Python API, YAML files and ``key=value`` overrides.

Each option group is a frozen dataclass whose fields carry a one-line docstring under them and are checked on
construction (types, then ranges, then cross-field rules), so a mistake is reported once, early, with the dotted key,
the bad value and what is allowed. Change a built config with ``dataclasses.replace``, which checks again.

    config = load_config("configs/tiny-cpu.yaml", ["loss.beta=0.2", "references.gemma.max_length=512"])
    config.loss.beta                          # 0.2
    config.training.to_training_arguments()   # transformers.TrainingArguments

List items are addressed by position from 0 (``references.1.max_length``) or, for references, by name
(``references.gemma.max_length``). Values are parsed as YAML, so ``1e-5`` is a number, ``true`` a bool,
``[q_proj,v_proj]`` a list and an empty value (``data.eval=``) or ``null`` is None.

This module imports nothing of ours; transformers is imported lazily, only to check and build the ``training``
section.
"""

import ast
import contextlib
import contextvars
import dataclasses
import difflib
import enum
import functools
import inspect
import math
import re
import textwrap
import types
import typing
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from mrpo.errors import ConfigError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DataFormat = Literal["auto", "standard", "conversational", "implicit"]
PaddingFree = Literal["auto"] | bool

DOCUMENT_AWARE_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")
"""Attention kernels that skip the work across packed documents; with sdpa/eager packing needs a dense mask."""


def padding_free_enabled(setting: PaddingFree, attn_implementation: str | None) -> bool:
    """Whether to pack sequences without padding: "auto" packs where the attention kernel makes it pay."""
    if setting == "auto":
        return attn_implementation in DOCUMENT_AWARE_ATTENTION
    return bool(setting)


INITIALISING_REFERENCE_NAME = "init"
_REFERENCE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# ---------------------------------------------------------------------------------------------------------------
# Dotted keys: a section builds its fields' full names from the prefix it is being built under.

_key_prefix: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mrpo_config_key_prefix", default=None
)


@contextlib.contextmanager
def _building(prefix: str) -> Iterator[None]:
    token = _key_prefix.set(prefix)
    try:
        yield
    finally:
        _key_prefix.reset(token)


def _dotted(section: str, name: str) -> str:
    prefix = _key_prefix.get()
    prefix = section if prefix is None else prefix
    return f"{prefix}.{name}" if prefix else name


# ---------------------------------------------------------------------------------------------------------------
# A small checker for the annotations our fields use: str, int, float (an int is accepted), bool, Literal,
# list[...], dict[...], X | None, Any, enums and classes.


def _match(value: Any, annotation: Any, *, lenient: bool) -> tuple[bool, Any]:
    """(whether ``value`` fits ``annotation``, the value to store: ints widened to floats, tuples to lists)."""
    if annotation is Any:
        return True, value
    if annotation is None or annotation is type(None):
        return value is None, value
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in arguments:
            fits, converted = _match(value, arm, lenient=lenient)
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
            fits, converted = _match(item, arguments[0], lenient=lenient)
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
                _match(item_key, key_type, lenient=lenient)[0]
                and _match(item_value, value_type, lenient=lenient)[0]
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


def _describe(annotation: Any) -> str:
    """What a value of ``annotation`` looks like, in words: ``'adaptive' or a list of numbers``."""
    if annotation is None or annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        arms = [arm for arm in arguments if arm is not type(None)]
        described = " or ".join(_describe(arm) for arm in arms)
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
        return f"a list of items that are each {_describe(item)}"
    if origin is dict:
        return "a mapping"
    if annotation in _PLAIN_NAMES:
        return _PLAIN_NAMES[annotation]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    if isinstance(annotation, type):
        return f"a {annotation.__name__}"
    return str(annotation)


def _literal_choices(annotation: Any) -> list[str]:
    """Every string a Literal (or enum) inside ``annotation`` allows, for did-you-mean suggestions."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return [allowed for allowed in typing.get_args(annotation) if isinstance(allowed, str)]
    if origin in (typing.Union, types.UnionType):
        return [choice for arm in typing.get_args(annotation) for choice in _literal_choices(arm)]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    return []


def _did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    """`` — did you mean 'loss.beta'?`` for the candidate closest to ``word`` (shown under ``prefix``), or ""."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" — did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""


def _conform(value: Any, annotation: Any, key: str, *, lenient: bool = False) -> Any:
    """``value`` as stored for ``annotation``, or a ConfigError naming ``key``, the value and what is allowed."""
    fits, converted = _match(value, annotation, lenient=lenient)
    if fits:
        return converted
    hint = _did_you_mean(value, _literal_choices(annotation)) if isinstance(value, str) else ""
    raise ConfigError(f"'{key}' must be {_describe(annotation)}, got {value!r}{hint}", key=key)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_field_types(config: Any, section: str) -> None:
    """Check every field of a dataclass against its annotation (storing widened values) — the first step of
    each section's ``__post_init__``."""
    hints = _type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        conformed = _conform(value, hints[field.name], _dotted(section, field.name))
        if conformed is not value:
            object.__setattr__(config, field.name, conformed)


def _fail(section: str, name: str, value: Any, requirement: str) -> typing.NoReturn:
    key = _dotted(section, name)
    raise ConfigError(f"'{key}' {requirement}, got {value!r}", key=key)


def _require_text(config: Any, section: str, name: str) -> None:
    value = getattr(config, name)
    if value is not None and not value.strip():
        _fail(section, name, value, "must not be empty")


def _require_at_least(config: Any, section: str, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if value is not None and value < minimum:
        _fail(section, name, value, f"must be at least {minimum}")


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


def resolve_dtype(dtype: Dtype, *, cuda: bool) -> str:
    """The concrete dtype name for a configured one: "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return "bfloat16" if cuda else "float32"
    return dtype


# ---------------------------------------------------------------------------------------------------------------
# The sections.


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """The model being trained, as it is at the start."""

    model: str
    """Hub id, local directory or .gguf file of the model the policy starts from."""
    tokenizer: str | None = None
    """Tokenizer (hub id or local directory) if not the model's own."""
    dtype: Dtype = "auto"
    """Weights dtype: "auto" is bfloat16 on CUDA and float32 on CPU."""
    attn_implementation: str | None = None
    """Attention kernel for from_pretrained ("sdpa", "eager", "flex_attention", "flash_attention_2"...); null = transformers' choice."""
    padding_free: PaddingFree = "auto"
    """Pack each micro-batch's sequences into one row without padding (true/false); "auto" packs with flex/flash attention."""
    pad_to_multiple_of: int | None = None
    """Round each (packed or padded) micro-batch length up to a multiple of this, so compiled models see few shapes."""
    compile: bool = False
    """torch.compile the decoder layers (worth it on GPUs; pair it with pad_to_multiple_of, e.g. 4096, packed)."""
    micro_batch_tokens: int | None = None
    """Token budget of one policy forward: a batch costing more (padded: 2 x pairs x longest; packed: total length; both rounded up to pad_to_multiple_of) is split into length-grouped micro-batches, each a forward and backward; the optimizer still steps on all the batch's pairs. A pair over the budget is a micro-batch of its own. null = one forward per batch."""

    def __post_init__(self) -> None:
        _check_field_types(self, "policy")
        for name in ("model", "tokenizer", "attn_implementation"):
            _require_text(self, "policy", name)
        _require_at_least(self, "policy", "pad_to_multiple_of", 1)
        _require_at_least(self, "policy", "micro_batch_tokens", 1)
        if (
            self.micro_batch_tokens
            and self.pad_to_multiple_of
            and self.micro_batch_tokens < self.pad_to_multiple_of
        ):
            _fail(
                "policy",
                "micro_batch_tokens",
                self.micro_batch_tokens,
                f"is below policy.pad_to_multiple_of ({self.pad_to_multiple_of}): every pair would be a micro-batch "
                "of its own; use a budget of several multiples",
            )


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """One reference model whose sequence log-probs are precomputed and cached; the first is the initialising one."""

    name: str
    """Short, filesystem-safe name: it names the reference's cache directory and its metrics."""
    model: str
    """Hub id, local directory or .gguf file of the reference model."""
    tokenizer: str | None = None
    """Tokenizer (hub id or local directory) if not the model's own; each reference reads the text with its own."""
    dtype: Dtype = "auto"
    """Dtype of the forward passes: "auto" is bfloat16 on CUDA and float32 on CPU (log-probs are summed in float32)."""
    max_length: int | None = None
    """Longest prompt + completion in this reference's tokens; null = data.max_length."""
    batch_tokens: int = 16384
    """Token budget of one precompute batch (padding included); lower it if the precompute runs out of memory."""
    hash_weights: Literal["auto", "full"] = "auto"
    """How the cache identifies the weights: "auto" hashes them whole up to 1 GiB, then 64 sampled MiB per file (fast; an in-place edit between samples goes unseen); "full" reads every byte."""

    def __post_init__(self) -> None:
        _check_field_types(self, "reference")
        if not _REFERENCE_NAME_PATTERN.match(self.name):
            _fail(
                "reference",
                "name",
                self.name,
                "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
                " (it names a cache directory)",
            )
        for name in ("model", "tokenizer"):
            _require_text(self, "reference", name)
        _require_at_least(self, "reference", "max_length", 1)
        _require_at_least(self, "reference", "batch_tokens", 1)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the preference pairs come from and how they are cut."""

    train: str
    """Training pairs: a local .jsonl/.json/.parquet file or directory, or a Hugging Face dataset id."""
    eval: str | None = None
    """Held-out pairs (same forms as train; may be the same dataset id with another split); null = none."""
    train_split: str = "train"
    """Split of `train` to read (for dataset ids and directories with splits)."""
    eval_split: str = "test"
    """Split of `eval` to read."""
    format: DataFormat = "auto"
    """Row format: "standard" (prompt/chosen/rejected strings), "conversational" (message lists), "implicit" (prompt inside chosen/rejected); "auto" detects it."""
    max_length: int = 1024
    """Longest prompt + completion in tokens, for the policy and for references without their own max_length."""
    overflow: Literal["drop", "truncate"] = "drop"
    """What to do with a pair longer than max_length for any model: drop it (counted), or truncate it (only when every model shares one tokenizer)."""
    max_pairs: int | None = None
    """Use a random subsample of this many training pairs (drawn with `seed`); null = all."""
    max_eval_pairs: int | None = None
    """Use a random subsample of this many held-out pairs; null = all."""
    seed: int = 0
    """Seed of the subsampling."""
    on_error: Literal["raise", "drop"] = "raise"
    """A malformed row: stop with an error naming file, row and field ("raise"), or skip it and count it ("drop")."""
    drop_identical: bool = False
    """Drop pairs whose chosen and rejected completions are identical (they carry no preference)."""

    def __post_init__(self) -> None:
        _check_field_types(self, "data")
        for name in ("train", "eval", "train_split", "eval_split"):
            _require_text(self, "data", name)
        for name in ("max_length", "max_pairs", "max_eval_pairs"):
            _require_at_least(self, "data", name, 1)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The MRPO loss (shared/mrpo-spec.md): how the K references combine into one virtual reference."""

    beta: float = 0.1
    """Strength of the pull towards the (virtual) reference, > 0; the beta of DPO."""
    weights: Literal["adaptive"] | list[float] = "adaptive"
    """Reference weights: "adaptive" (each reference's confidence on the pair) or K non-negative numbers, normalised to sum 1."""
    clip: Literal["adaptive", "fixed", "off"] = "adaptive"
    """Trust region around the initialising reference for the others' log-probs: adaptive eps per pair, fixed eps, or off."""
    eps: float = 0.1
    """Width of the trust region, >= 0: eps_max when clip is adaptive, eps when fixed, ignored when off."""
    aggregation: Literal["harmonic", "geometric", "mdpo"] = "harmonic"
    """Virtual reference: the paper's weighted harmonic mean, the weighted geometric mean, or the multi-DPO baseline."""
    align: Literal["none", "pair"] = "none"
    """Level alignment (research variant): "pair" shifts each external reference to the initialising one's mean level per pair before clipping."""

    def __post_init__(self) -> None:
        _check_field_types(self, "loss")
        if not (math.isfinite(self.beta) and self.beta > 0):
            _fail("loss", "beta", self.beta, "must be a number > 0 (typically 0.01 to 0.5)")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            _fail("loss", "eps", self.eps, "must be a number >= 0 (the default is 0.1)")
        if isinstance(self.weights, list):
            if not self.weights:
                _fail("loss", "weights", self.weights, 'must be "adaptive" or one number per reference')
            if not all(math.isfinite(weight) and weight >= 0 for weight in self.weights):
                _fail("loss", "weights", self.weights, "must all be finite and >= 0")
            if sum(self.weights) <= 0:
                _fail("loss", "weights", self.weights, "must not all be zero")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the policy (peft); off means full fine-tuning."""

    enabled: bool = False
    """Train LoRA adapters instead of all the weights; the initialising reference is then the base with adapters off."""
    r: int = 16
    """Rank of each adapter."""
    alpha: int = 32
    """Adapter scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapters' input, in [0, 1)."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """Modules to adapt: "all-linear" (every linear layer but the output head) or names such as [q_proj, v_proj]."""
    save_merged: bool = False
    """Also save a copy of the model with the adapters merged into the weights (ignored when LoRA is off)."""

    def __post_init__(self) -> None:
        _check_field_types(self, "lora")
        _require_at_least(self, "lora", "r", 1)
        _require_at_least(self, "lora", "alpha", 1)
        if not 0 <= self.dropout < 1:
            _fail("lora", "dropout", self.dropout, "must be in [0, 1)")
        if isinstance(self.target_modules, list):
            if not self.target_modules or not all(name.strip() for name in self.target_modules):
                _fail(
                    "lora",
                    "target_modules",
                    self.target_modules,
                    'must be "all-linear" or a non-empty list of module names',
                )


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
    """Live warnings during training (each fires once, in the log and in OUTPUT/diagnostics.jsonl)."""

    enabled: bool = True
    """Watch the logged metrics and warn when training goes degenerate; false silences every warning."""
    window: int = 5
    """Number of consecutive train log lines a condition is judged over."""
    clip_saturation: float = 0.9
    """Warn when the external references' clip rate stays above this over a window (MRPO then trains as DPO)."""
    alpha_collapse: float = 0.95
    """Warn when one reference's mean weight alpha stays above this over a window."""

    def __post_init__(self) -> None:
        _check_field_types(self, "diagnostics")
        _require_at_least(self, "diagnostics", "window", 1)
        for name in ("clip_saturation", "alpha_collapse"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                _fail("diagnostics", name, value, "must be a share in (0, 1]")


def check_lora_targets(config: LoraConfig, module_names: Iterable[str]) -> None:
    """Raise a ConfigError if a LoRA target module matches none of the model's module names.

    ``module_names`` are the names of the model's linear modules, e.g.
    ``[name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]``. A target matches
    a module whose name is the target or ends with ``"." + target`` (peft's rule). Nothing to check when LoRA is
    off or the target is "all-linear".
    """
    if not config.enabled or config.target_modules == "all-linear":
        return
    names = list(module_names)
    missing = [
        target
        for target in config.target_modules
        if not any(_lora_target_matches(target, name) for name in names)
    ]
    if not missing:
        return
    available = sorted({name.rsplit(".", 1)[-1] for name in names})
    shown = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "") if available else "none"
    hint = _did_you_mean(missing[0], available) if len(missing) == 1 else ""
    raise ConfigError(
        f"'lora.target_modules' = {config.target_modules!r}: the model has no module named {', '.join(map(repr, missing))}"
        f'{hint}; its linear modules are named: {shown} (or use "all-linear")',
        key="lora.target_modules",
    )


def _lora_target_matches(target: str, module_name: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


# ---------------------------------------------------------------------------------------------------------------
# The training section: passed through to transformers.TrainingArguments.


@functools.cache
def _training_argument_types() -> dict[str, Any]:
    """TrainingArguments' constructor fields and their annotations (imports transformers, without building one)."""
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
    allowed = _training_argument_types()
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
        allowed = dict(_training_argument_types())
        for old_name, new_name in _RENAMED_TRAINING_ARGUMENTS.items():  # either name, whichever is installed
            if (old_name in allowed) != (new_name in allowed):
                allowed.setdefault(old_name, allowed.get(new_name))
                allowed.setdefault(new_name, allowed.get(old_name))
        for key, value in merged.items():
            dotted = _dotted("training", key)
            if not isinstance(key, str) or key not in allowed:
                raise ConfigError(
                    f"unknown key '{dotted}'{_did_you_mean(str(key), allowed, dotted.rpartition('.')[0])} — the 'training' section takes the"
                    " arguments of transformers.TrainingArguments",
                    key=dotted,
                )
            annotation = bool | str | None if key == "resume_from_checkpoint" else allowed[key]
            _conform(value, annotation, dotted, lenient=True)  # checked, but stored as written: 10 stays 10
        if merged["remove_unused_columns"]:
            raise ConfigError(
                f"'{_dotted('training', 'remove_unused_columns')}' must stay false, got True: the MRPO collator needs"
                " the pair columns that Trainer would remove",
                key=_dotted("training", "remove_unused_columns"),
            )
        self._arguments = merged

    @classmethod
    def unchecked(cls, arguments: Mapping[str, Any]) -> "TrainingConfig":
        """The section with the defaults merged in but its keys not checked against TrainingArguments, for commands
        that never train (``mrpo inspect``): the check imports transformers' training stack, seconds on a CPU.
        ``to_training_arguments`` still rejects an unknown key."""
        section = cls.__new__(cls)
        section._arguments = {**cls.DEFAULTS, **arguments}
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
                f"unknown key 'training.{key}'{_did_you_mean(key, _training_argument_types(), 'training')} — this"
                " version of transformers.TrainingArguments does not take it",
                key=f"training.{key}",
            ) from None
        except ValueError as error:
            raise ConfigError(
                f"transformers.TrainingArguments rejected the 'training' section: {error}"
            ) from None


# ---------------------------------------------------------------------------------------------------------------
# The whole run.


def default_references(policy: PolicyConfig) -> list[ReferenceConfig]:
    """The references of a config that lists none: the policy's starting model alone (K = 1, plain DPO)."""
    return [
        ReferenceConfig(
            name=INITIALISING_REFERENCE_NAME,
            model=policy.model,
            tokenizer=policy.tokenizer,
            dtype=policy.dtype,
        )
    ]


@dataclasses.dataclass(frozen=True)
class MRPOConfig:
    """Everything an MRPO run needs: policy, references, data, loss, LoRA, training arguments and cache."""

    policy: PolicyConfig
    """The model being trained."""
    data: DataConfig
    """Where the preference pairs come from."""
    references: list[ReferenceConfig] | None = None
    """The K references; the first is the initialising reference (the policy's starting model). Null = that one alone."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """How the references combine into the loss."""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    """LoRA adapters, or full fine-tuning."""
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    """Arguments of transformers.TrainingArguments (plus resume_from_checkpoint)."""
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    """Live warnings while training (clip saturation, alpha collapse, divergence)."""
    cache_dir: str = ".cache/mrpo"
    """Directory of the reference log-prob caches (content-keyed: shared safely between runs)."""

    SECTIONS: typing.ClassVar[tuple[str, ...]] = (
        "policy", "references", "data", "loss", "lora", "training", "diagnostics", "cache_dir"
    )  # fmt: skip

    def __post_init__(self) -> None:
        _check_field_types(self, "")
        if self.references is None:
            object.__setattr__(self, "references", default_references(self.policy))
        _require_text(self, "", "cache_dir")
        references: list[ReferenceConfig] = self.references  # type: ignore[assignment]
        if not references:
            raise ConfigError(
                "'references' must list at least one reference (the first is the policy's starting model); leave"
                " the key out to use the policy's model alone",
                key="references",
            )
        first_index_of: dict[str, int] = {}
        for index, reference in enumerate(references):
            if reference.name in first_index_of:
                key = f"references.{index}.name"
                raise ConfigError(
                    f"'{key}' = {reference.name!r} is already the name of references.{first_index_of[reference.name]};"
                    " each reference needs its own name (it names its cache and its metrics)",
                    key=key,
                )
            first_index_of[reference.name] = index
        if isinstance(self.loss.weights, list) and len(self.loss.weights) != len(references):
            raise ConfigError(
                f"'loss.weights' = {self.loss.weights!r} has {len(self.loss.weights)} numbers but there are"
                f" {len(references)} references ({', '.join(reference.name for reference in references)});"
                ' give one weight per reference, or use "adaptive"',
                key="loss.weights",
            )
        if self.training.eval_strategy != "no" and self.data.eval is None:
            raise ConfigError(
                f"'training.eval_strategy' = {self.training.eval_strategy!r} needs held-out pairs: set 'data.eval'"
                " (a file or dataset id) or set training.eval_strategy to 'no'",
                key="training.eval_strategy",
            )
        initialising = references[0]
        if initialising.model != self.policy.model:
            warnings.warn(
                f"references.0 ({initialising.name!r}) is the initialising reference and should be the policy's"
                f" starting model, but its model is {initialising.model!r} while policy.model is"
                f" {self.policy.model!r}. Fine if both are the same weights under two paths; otherwise the loss"
                " measures the policy against the wrong start.",
                UserWarning,
                stacklevel=2,
            )

    @property
    def initialising_reference(self) -> ReferenceConfig:
        """Reference 1 of the paper: the model the policy starts from."""
        return self.references[0]  # type: ignore[index]

    def reference_max_length(self, reference: ReferenceConfig) -> int:
        """The max_length a reference tokenizes to: its own, or data.max_length."""
        return reference.max_length if reference.max_length is not None else self.data.max_length

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, check_training: bool = True) -> "MRPOConfig":
        """Build and check a config from plain data (a parsed YAML file); unknown and missing keys are errors.

        ``check_training=False`` leaves the training section's keys unchecked (see ``TrainingConfig.unchecked``).
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"a config must be a mapping of sections ({', '.join(cls.SECTIONS)}), got {raw!r}"
            )
        _reject_unknown_keys(raw, cls.SECTIONS, "")
        for required in ("policy", "data"):
            if raw.get(required) is None:
                first_field = "model" if required == "policy" else "train"
                doc = field_docs(PolicyConfig if required == "policy" else DataConfig).get(first_field, "")
                raise ConfigError(
                    f"missing section '{required}': it needs at least '{required}.{first_field}' ({doc})",
                    key=required,
                )
        sections: dict[str, Any] = {
            "policy": _build_section(PolicyConfig, raw["policy"], "policy"),
            "data": _build_section(DataConfig, raw["data"], "data"),
        }
        for name, section_class in (
            ("loss", LossConfig),
            ("lora", LoraConfig),
            ("diagnostics", DiagnosticsConfig),
        ):
            if raw.get(name) is not None:
                sections[name] = _build_section(section_class, raw[name], name)
        if raw.get("training") is not None:
            training = raw["training"]
            if not isinstance(training, Mapping):
                raise ConfigError(
                    f"'training' must be a mapping of TrainingArguments keys, got {training!r}",
                    key="training",
                )
            with _building("training"):
                sections["training"] = (
                    TrainingConfig(training) if check_training else TrainingConfig.unchecked(training)
                )
        if raw.get("references") is not None:
            references = raw["references"]
            if not isinstance(references, list):
                raise ConfigError(
                    f"'references' must be a list of references (each with name and model), got {references!r}",
                    key="references",
                )
            sections["references"] = [
                _build_section(ReferenceConfig, reference, f"references.{index}")
                for index, reference in enumerate(references)
            ]
        if "cache_dir" in raw:
            sections["cache_dir"] = raw["cache_dir"]
        return cls(**sections)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (defaults filled in); ``from_dict`` of it gives an equal config."""
        return {
            "policy": dataclasses.asdict(self.policy),
            "references": [dataclasses.asdict(reference) for reference in self.references],  # type: ignore[union-attr]
            "data": dataclasses.asdict(self.data),
            "loss": dataclasses.asdict(self.loss),
            "lora": dataclasses.asdict(self.lora),
            "training": self.training.to_dict(),
            "diagnostics": dataclasses.asdict(self.diagnostics),
            "cache_dir": self.cache_dir,
        }

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML; ``load_config(path)`` reads back an equal config."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def _reject_unknown_keys(raw: Mapping[str, Any], allowed: Sequence[str], prefix: str) -> None:
    for key in raw:
        if key not in allowed:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            suggestion = _did_you_mean(str(key), allowed, prefix)
            if not suggestion:
                where = f"'{prefix}'" if prefix else "a config"
                suggestion = f"; the keys of {where} are: {', '.join(allowed)}"
            raise ConfigError(f"unknown key '{dotted}'{suggestion}", key=dotted)


def _build_section(section_class: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{prefix}' must be a mapping of keys, got {raw!r}", key=prefix)
    fields = [field for field in dataclasses.fields(section_class) if field.init]
    _reject_unknown_keys(raw, [field.name for field in fields], prefix)
    for field in fields:
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and field.name not in raw:
            doc = field_docs(section_class).get(field.name, "")
            raise ConfigError(f"missing key '{prefix}.{field.name}' ({doc})", key=f"{prefix}.{field.name}")
    with _building(prefix):
        return section_class(**raw)


# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML files and key=value overrides.


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


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: no arbitrary objects


def parse_override(override: str) -> tuple[str, Any]:
    """``"loss.beta=0.2"`` -> ``("loss.beta", 0.2)``; the value is parsed as YAML, an empty value is None."""
    key, separator, text = override.partition("=")
    key = key.strip()
    if not separator or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. loss.beta=0.2")
    try:
        value = _parse_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({error})", key=key) from None
    return key, value


def _apply_override(root: dict[str, Any], key: str, value: Any) -> str:
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
        f"'{here}': no item named {part!r}{_did_you_mean(part, [n for n in names if isinstance(n, str)])}; use a"
        f" position (0 to {len(items) - 1}) or one of the names {names}",
        key=here,
    )


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), *, check_training: bool = True
) -> MRPOConfig:
    """Read a YAML config (or start empty when ``path`` is None), apply ``key=value`` overrides, check, build.

    Every mistake raises one ConfigError naming the file or override, the dotted key, the bad value and what is
    allowed. ``check_training=False`` is for commands that never train (see ``TrainingConfig.unchecked``).
    """
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = _parse_yaml(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections, got {raw!r}")
    applied_overrides = []
    for override in overrides:
        key, value = parse_override(override)
        applied_overrides.append((override, _apply_override(raw, key, value)))
    try:
        return MRPOConfig.from_dict(raw, check_training=check_training)
    except ConfigError as error:
        source = _source_of(error.key, applied_overrides)
        message = str(error)
        if source:
            message = f"{message} (from the override {source!r})"
        elif path is not None:
            message = f"{path}: {message}"
        raise ConfigError(message, key=error.key) from None


def _source_of(key: str | None, overrides: list[tuple[str, str]]) -> str | None:
    """The last override that set ``key`` (or a section holding it, or a key inside it), if any."""
    if key is None:
        return None
    for text, override_key in reversed(overrides):
        if override_key == key or key.startswith(override_key + ".") or override_key.startswith(key + "."):
            return text
    return None
