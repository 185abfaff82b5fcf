"""The config reference, generated from the schema itself (field types, defaults and one-line docs):
``docs/config.md`` (a test keeps it current) and ``mrpo defaults`` (a complete YAML config to start from)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from mrpo.config.schema import (
    LORA_LEARNING_RATE,
    DataConfig,
    DiagnosticsConfig,
    LoraConfig,
    LossConfig,
    MRPOConfig,
    PolicyConfig,
    ReferenceConfig,
)
from mrpo.config.training import TrainingConfig
from mrpo.config.typecheck import describe, field_docs

SECTIONS: tuple[tuple[str, type, str], ...] = (
    ("policy", PolicyConfig, "The model being trained (required: `policy.model`)."),
    ("references", ReferenceConfig, "A list; the first is the initialising reference (the policy's start). "
     "Left out: the policy's model alone (K = 1, plain DPO). Items are addressed by position or name in "
     "overrides: `references.1.dtype=bfloat16`, `references.gemma.max_length=512`."),
    ("data", DataConfig, "Where the preference pairs come from (required: `data.train`)."),
    ("loss", LossConfig, "The MRPO loss (docs/method.md)."),
    ("lora", LoraConfig, "LoRA adapters through PEFT, or full fine-tuning."),
    ("diagnostics", DiagnosticsConfig, "Live warnings while training."),
)  # fmt: skip

EXAMPLE_REQUIRED = {"policy.model": "HuggingFaceTB/SmolLM2-135M-Instruct", "data.train": "pairs.jsonl"}


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _shown(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "**required**"
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def reference_markdown() -> str:
    """``docs/config.md``."""
    lines = [
        "# Config reference",
        "",
        "Generated from the schema (`src/mrpo/config/schema.py`) by `mrpo defaults --markdown`; a test keeps it current.",
        "`mrpo defaults` prints the same as a YAML file to start from. Every key can be overridden on the command",
        "line as `section.key=value` (values are YAML), or TRL-style as `--key value` when the name is unique.",
        "A name the references share with the policy or data section means theirs, as in TRL: `--max_length` is",
        "`data.max_length` and `--dtype` is `policy.dtype`; set a reference's by its dotted key",
        "(`references.1.max_length=512`). A bool key given bare is true (`--gradient_checkpointing --max_steps 3`).",
        "",
    ]
    hints = typing.get_type_hints
    for name, cls, about in SECTIONS:
        lines += [f"## `{name}`", "", about, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        docs, types = field_docs(cls), hints(cls)
        for field in dataclasses.fields(cls):
            meaning = docs.get(field.name, "").replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| `{field.name}` | {describe(types[field.name])} | {_shown(_default(field))} | {meaning} |"
            )
        lines.append("")
    lines += [
        "## `training`",
        "",
        "Any argument of `transformers.TrainingArguments` (checked by name and type before anything loads), plus",
        "`resume_from_checkpoint`. mrpo's defaults differ from transformers' where preference training needs it:",
        "",
        "| key | default | why |",
        "|---|---|---|",
        "| `learning_rate` | `1e-06`, or `0.0005` with `lora.enabled` | full fine-tuning: TRL's DPO default "
        "(transformers' 5e-5 is 50x larger); LoRA adapters start at zero and need larger steps (the demo's 5e-4). "
        "A value you set is used as given; the run's `mrpo_config.yaml` records the effective one |",
        "| `logging_steps` | `10` | |",
        "| `report_to` | `none` | no tracker unless asked (`tensorboard` needs `pip install 'mrpo[tensorboard]'`) |",
        "| `remove_unused_columns` | `false` | must stay false: the collator needs the pair columns |",
        "| `logging_nan_inf_filter` | `false` | a non-finite log-prob already stops training with a clear error |",
        "| `seed` | `0` | |",
        "| `output_dir` | `runs/mrpo` | the run directory: config, metrics, checkpoints, the adapter, the model card |",
        "",
        "## `cache_dir`",
        "",
        f"{field_docs(MRPOConfig).get('cache_dir', '')} Default {_shown(MRPOConfig.__dataclass_fields__['cache_dir'].default)}.",
        "",
        "## `loss.weights` is not TRL's `loss_weights`",
        "",
        "TRL's `loss_weights` weighs several *loss types* against each other; mrpo's `loss.weights` weighs the K",
        "*references* inside one MRPO loss (`adaptive`, or K numbers normalised to sum 1).",
    ]
    return "\n".join(lines) + "\n"


def defaults_yaml() -> str:
    """A complete config with every default, each key commented with its meaning (``mrpo defaults``)."""
    lines = [
        "# mrpo config: every key with its default. Required keys carry an example value; change them.",
        "# Reference: docs/config.md. Run: mrpo train this.yaml   (overrides: section.key=value)",
    ]
    for name, cls, about in SECTIONS:
        lines += ["", f"# {about}"]
        docs = field_docs(cls)
        indent = "  "
        if name == "references":
            lines.append("references:")
            lines.append("  - name: init")
            lines.append(f"    model: {EXAMPLE_REQUIRED['policy.model']}")
            indent = "    "
            fields = [f for f in dataclasses.fields(cls) if f.name not in ("name", "model")]
        else:
            lines.append(f"{name}:")
            fields = list(dataclasses.fields(cls))
        for field in fields:
            value = _default(field)
            if value is dataclasses.MISSING:
                value = EXAMPLE_REQUIRED[f"{name}.{field.name}"]
            text = yaml.safe_dump({field.name: value}, default_flow_style=True, width=1000).strip()[1:-1]
            lines.append(f"{indent}{text}  # {docs.get(field.name, '')}")
    lines += ["", "# Any transformers.TrainingArguments key; these are mrpo's defaults.", "training:"]
    for key, value in TrainingConfig.DEFAULTS.items():
        if key == "learning_rate":  # left unset, so that its default follows lora.enabled
            lines.append(
                f"  # learning_rate: {value} for full fine-tuning, {LORA_LEARNING_RATE} with lora.enabled"
            )
            continue
        lines.append(f"  {yaml.safe_dump({key: value}, default_flow_style=True).strip()[1:-1]}")
    lines += ["", f"cache_dir: {MRPOConfig.__dataclass_fields__['cache_dir'].default}"]
    return "\n".join(lines) + "\n"
