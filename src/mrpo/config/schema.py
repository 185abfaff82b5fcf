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

This module holds the sections, their checks of field values and ``load_config``. Reading the text (the YAML
dialect, ``key=value`` overrides) is ``mrpo.config.overrides``', the field type checks ``mrpo.config.typecheck``'s
and the ``training`` section (checked against ``transformers.TrainingArguments``, imported lazily)
``mrpo.config.training``'s. Rules that act when a run loads live where they act: the dtype "auto" stands for and
the check of LoRA targets against a model in ``mrpo.models``, whether to pack without padding in
``mrpo.collator``. It imports only ``mrpo.config`` modules and ``mrpo.errors``.
"""

import dataclasses
import math
import re
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from mrpo.config.overrides import (
    INITIALISING_REFERENCE_NAME,
    apply_override,
    parse_override,
    parse_yaml,
    source_of,
)
from mrpo.config.training import TrainingConfig
from mrpo.config.typecheck import (
    check_field_types,
    did_you_mean,
    fail,
    field_docs,
    require_at_least,
    require_text,
)
from mrpo.errors import ConfigError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DataFormat = Literal["auto", "standard", "conversational", "implicit"]
AutoBool = Literal["auto"] | bool
"""A setting that is true, false, or "auto": chosen where it acts (the fast path: mrpo.fast_path)."""

_REFERENCE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# ---------------------------------------------------------------------------------------------------------------
# The sections.


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """The model being trained, as it is at the start."""

    SECTION: typing.ClassVar[str] = "policy"
    """The section's own name in error keys (``policy.<field>``)."""

    model: str
    """Hub id, local directory or .gguf file of the model the policy starts from."""
    tokenizer: str | None = None
    """Tokenizer (hub id or local directory) if not the model's own."""
    dtype: Dtype = "auto"
    """Weights dtype: "auto" is bfloat16 on CUDA and float32 on CPU."""
    attn_implementation: str | None = None
    """Attention kernel for from_pretrained ("sdpa", "eager", "flex_attention", "flash_attention_2"...); null = transformers' choice."""
    padding_free: AutoBool = "auto"
    """Pack each micro-batch's sequences into one row without padding (true/false); "auto" packs with flex/flash attention."""
    prefix_shared: AutoBool = "auto"
    """Score each pair in one row, its prompt computed once: [prompt | chosen | rejected], a mask keeping the rejected answer from seeing the chosen one (the same log-probs up to float rounding, fewer tokens; needs sdpa, eager or flex attention, not flash). Also how training's held-out evaluation and `mrpo evaluate` score. "auto": on the CPU unless padding_free packs (mrpo.fast_path; `mrpo train --dry-run` says what was chosen). true is refused alongside padding_free: true."""
    pad_to_multiple_of: int | None = None
    """Round each (packed or padded) micro-batch length up to a multiple of this, so compiled models see few shapes; under micro_batch_tokens, null = four lengths per doubling (..., 96, 112, 128, 160, ...) and 1 = exact lengths."""
    compile: AutoBool = "auto"
    """torch.compile the decoder layers. "auto": on CUDA with packed rows (padding_free), each row's length then rounded to a bucket so shapes repeat; off on the CPU."""
    micro_batch_tokens: int | None = None
    """Token budget of one policy forward: a batch costing more (padded: 2 x pairs x longest; packed: total length; prefix-shared: pairs x longest row; each rounded up to its bucket) is split into length-grouped micro-batches, each a forward and backward; the optimizer still steps on all the batch's pairs. A pair over the budget is a micro-batch of its own. Each micro-batch's length is rounded up to a bucket (pad_to_multiple_of) so that shapes repeat. null = one forward per batch."""

    def __post_init__(self) -> None:
        check_field_types(self, "policy")
        for name in ("model", "tokenizer", "attn_implementation"):
            require_text(self, "policy", name)
        require_at_least(self, "policy", "pad_to_multiple_of", 1)
        require_at_least(self, "policy", "micro_batch_tokens", 1)
        if self.prefix_shared is True and self.padding_free is True:
            fail(
                "policy",
                "padding_free",
                True,
                "cannot be combined with policy.prefix_shared: choose one row layout",
            )
        if self.prefix_shared is True and (self.attn_implementation or "").startswith("flash"):
            fail(
                "policy",
                "prefix_shared",
                True,
                f"needs an attention kernel that takes a 4D mask (sdpa, eager, flex_attention), not "
                f"{self.attn_implementation!r}",
            )
        if (
            self.micro_batch_tokens
            and self.pad_to_multiple_of
            and self.micro_batch_tokens < self.pad_to_multiple_of
        ):
            fail(
                "policy",
                "micro_batch_tokens",
                self.micro_batch_tokens,
                f"is below policy.pad_to_multiple_of ({self.pad_to_multiple_of}): every pair would be a micro-batch "
                "of its own; use a budget of several multiples",
            )


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """One reference model whose sequence log-probs are precomputed and cached; the first is the initialising one."""

    SECTION: typing.ClassVar[str] = "reference"
    """The section's own name in error keys (``reference.<field>``)."""

    name: str
    """Short, filesystem-safe name: it names the reference's cache directory and its metrics."""
    model: str
    """Hub id, local directory or .gguf file of the reference model."""
    tokenizer: str | None = None
    """Tokenizer (hub id or local directory) if not the model's own; each reference reads the text with its own."""
    tokens: Literal["own", "policy"] = "own"
    """Which token ids the reference scores: "own" = the text as its own tokenizer and chat template render it (the method; see docs/method.md). "policy" is a reproduction of the authors' released code (arXiv 2405.16388), never needed for training: the reference scores the policy's token ids (the policy's rendering, chat template and prompt/completion boundary). Allowed only when the reference's embedding rows (its config's vocab_size) cover every id the policy's tokenizer can produce; that makes the ids valid indices, not the vocabularies the same, so a reference of another family scores garbage text whose log-prob grows with its length. Part of the reference store's key."""
    dtype: Dtype = "auto"
    """Dtype of the forward passes: "auto" is bfloat16 on CUDA and float32 on CPU (log-probs are summed in float32)."""
    max_length: int | None = None
    """Longest prompt + completion in this reference's tokens (with tokens: policy, in the policy's tokens); null = data.max_length."""
    batch_tokens: int = 16384
    """Token budget of one precompute batch (padding included); lower it if the precompute runs out of memory."""
    prefix_shared: AutoBool = "auto"
    """Score each pair in one row, its prompt computed once (see policy.prefix_shared); "auto": on the CPU. Not part of the store key: the numbers differ from padded rows by float rounding only, as with another batch_tokens."""
    hash_weights: Literal["auto", "full"] = "auto"
    """How the cache identifies the weights: "auto" hashes them whole up to 1 GiB, then 64 sampled MiB per file (fast; an in-place edit between samples goes unseen); "full" reads every byte."""

    def __post_init__(self) -> None:
        check_field_types(self, "reference")
        if not _REFERENCE_NAME_PATTERN.match(self.name):
            fail(
                "reference",
                "name",
                self.name,
                "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
                " (it names a cache directory)",
            )
        for name in ("model", "tokenizer"):
            require_text(self, "reference", name)
        require_at_least(self, "reference", "max_length", 1)
        require_at_least(self, "reference", "batch_tokens", 1)
        if self.tokens == "policy" and self.tokenizer is not None:
            fail(
                "reference",
                "tokenizer",
                self.tokenizer,
                "is not read with tokens: policy (the reference scores the policy's token ids); leave it out",
            )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the preference pairs come from and how they are cut."""

    SECTION: typing.ClassVar[str] = "data"
    """The section's own name in error keys (``data.<field>``)."""

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
    cache_tokenized: bool = True
    """Keep the tokenized pairs on disk under cache_dir, read pair by pair (memory does not grow with the data) and reused by the next run on the same file, tokenizers and settings; false = read and tokenize in memory on every run. Applies to local files and directories without max_pairs / max_eval_pairs."""
    num_proc: int | None = None
    """Processes that tokenize, as in datasets' map: null or 1 = this process; N > 1 spawns N worker processes, each tokenizing blocks of 256 pairs (at most two each in flight, so a stream stays a stream), with the same tokens, order and drops as one process and the same tokenized cache entry. Under accelerate launch the machine's first process builds the cache with all N while the others wait; without the cache each of the machine's processes uses N / their number. A Python script that sets it needs the `if __name__ == "__main__":` guard (spawned workers import the script)."""

    def __post_init__(self) -> None:
        check_field_types(self, "data")
        for name in ("train", "eval", "train_split", "eval_split"):
            require_text(self, "data", name)
        for name in ("max_length", "max_pairs", "max_eval_pairs", "num_proc"):
            require_at_least(self, "data", name, 1)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The MRPO loss (docs/method.md): how the K references combine into one virtual reference."""

    SECTION: typing.ClassVar[str] = "loss"
    """The section's own name in error keys (``loss.<field>``)."""

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
    length_normalize: bool = False
    """Length-controlled variant (not the paper's): divide every model's log-prob of a response by the response's length in the policy's tokens before the loss, so margins are per-token rates and do not grow with the answers' length difference (docs/method.md §7). Per-token margins are about 1/length of the sums: beta must grow accordingly."""

    def __post_init__(self) -> None:
        check_field_types(self, "loss")
        if not (math.isfinite(self.beta) and self.beta > 0):
            fail("loss", "beta", self.beta, "must be a number > 0 (typically 0.01 to 0.5)")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            fail("loss", "eps", self.eps, "must be a number >= 0 (the default is 0.1)")
        if isinstance(self.weights, list):
            if not self.weights:
                fail("loss", "weights", self.weights, 'must be "adaptive" or one number per reference')
            if not all(math.isfinite(weight) and weight >= 0 for weight in self.weights):
                fail("loss", "weights", self.weights, "must all be finite and >= 0")
            if sum(self.weights) <= 0:
                fail("loss", "weights", self.weights, "must not all be zero")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the policy (peft); off means full fine-tuning."""

    SECTION: typing.ClassVar[str] = "lora"
    """The section's own name in error keys (``lora.<field>``)."""

    enabled: bool = False
    """Train LoRA adapters instead of all the weights; the initialising reference is then the base with adapters off. The default training.learning_rate is then 5e-4 (1e-6 for full fine-tuning)."""
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
        check_field_types(self, "lora")
        require_at_least(self, "lora", "r", 1)
        require_at_least(self, "lora", "alpha", 1)
        if not 0 <= self.dropout < 1:
            fail("lora", "dropout", self.dropout, "must be in [0, 1)")
        if isinstance(self.target_modules, list):
            if not self.target_modules or not all(name.strip() for name in self.target_modules):
                fail(
                    "lora",
                    "target_modules",
                    self.target_modules,
                    'must be "all-linear" or a non-empty list of module names',
                )


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
    """Live warnings during training (each fires once, in the log and in OUTPUT/diagnostics.jsonl)."""

    SECTION: typing.ClassVar[str] = "diagnostics"
    """The section's own name in error keys (``diagnostics.<field>``)."""

    enabled: bool = True
    """Watch the logged metrics and warn when training goes degenerate; false silences every warning."""
    window: int = 5
    """Number of consecutive train log lines a condition is judged over."""
    clip_saturation: float = 0.9
    """Warn when the external references' clip rate stays above this over a window (MRPO then trains as DPO)."""
    alpha_collapse: float = 0.95
    """Warn when one reference's mean weight alpha stays above this over a window."""

    def __post_init__(self) -> None:
        check_field_types(self, "diagnostics")
        require_at_least(self, "diagnostics", "window", 1)
        for name in ("clip_saturation", "alpha_collapse"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                fail("diagnostics", name, value, "must be a share in (0, 1]")


# ---------------------------------------------------------------------------------------------------------------
# The whole run.

LORA_LEARNING_RATE = 5e-4
"""The default training.learning_rate with LoRA: adapters start at zero and need a far larger step than full
fine-tuning's 1e-6 to move in a short run (the demo trains SmolLM2's adapters at 5e-4)."""


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
        check_field_types(self, "")
        default_rate = LORA_LEARNING_RATE if self.lora.enabled else TrainingConfig.DEFAULTS["learning_rate"]
        object.__setattr__(self, "training", self.training.with_defaults({"learning_rate": default_rate}))
        if self.references is None:
            object.__setattr__(self, "references", default_references(self.policy))
        require_text(self, "", "cache_dir")
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

    def save(self, path: str | Path, *, training: Mapping[str, Any] | None = None) -> None:
        """Write the resolved config as YAML; ``load_config(path)`` reads back an equal config.

        ``training`` adds keys to the training section as written (``mrpo train`` records the effective training
        arguments, defaults included, so the file says what the run used and reruns it exactly).
        """
        content = self.to_dict()
        content["training"] = {**content["training"], **(training or {})}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(content, sort_keys=False, allow_unicode=True), encoding="utf-8")

    def with_absolute_paths(self) -> "MRPOConfig":
        """The same config with every local path (data, models, tokenizers, cache, output) made absolute, so a saved
        copy reruns from any directory. Hub ids and dataset ids (no such local path) are left as written."""

        def local(value: str | None) -> str | None:
            return str(Path(value).resolve()) if value is not None and Path(value).exists() else value

        data = dataclasses.replace(self.data, train=local(self.data.train), eval=local(self.data.eval))
        policy = dataclasses.replace(
            self.policy, model=local(self.policy.model), tokenizer=local(self.policy.tokenizer)
        )
        references = [
            dataclasses.replace(reference, model=local(reference.model), tokenizer=local(reference.tokenizer))
            for reference in self.references  # type: ignore[union-attr]
        ]
        training = self.training.to_dict()
        training["output_dir"] = str(Path(training["output_dir"]).resolve())
        return dataclasses.replace(
            self,
            data=data,
            policy=policy,
            references=references,
            training=TrainingConfig.unchecked(training),
            cache_dir=str(Path(self.cache_dir).resolve()),
        )


def _reject_unknown_keys(raw: Mapping[str, Any], allowed: Sequence[str], prefix: str) -> None:
    for key in raw:
        if key not in allowed:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            suggestion = did_you_mean(str(key), allowed, prefix)
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
    try:
        return section_class(**raw)
    except ConfigError as error:
        raise _under(error, section_class.SECTION, prefix) from None


def _under(error: ConfigError, section: str, prefix: str) -> ConfigError:
    """The error of a section built as ``prefix`` (``references.1``) rather than under its own name
    (``reference``): the same message with the key renamed."""
    if section == prefix or not error.key or not error.key.startswith(section + "."):
        return error
    key = prefix + error.key[len(section) :]
    return ConfigError(str(error).replace(f"'{error.key}'", f"'{key}'"), key=key)


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
            raw = parse_yaml(path.read_text(encoding="utf-8"))
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
        applied_overrides.append((override, apply_override(raw, key, value)))
    try:
        return MRPOConfig.from_dict(raw, check_training=check_training)
    except ConfigError as error:
        source = source_of(error.key, applied_overrides)
        message = str(error)
        if source:
            message = f"{message} (from the override {source!r})"
        elif path is not None:
            message = f"{path}: {message}"
        raise ConfigError(message, key=error.key) from None
