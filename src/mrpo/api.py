"""The Python entry point: ``mrpo.build_trainer`` makes a ready ``MRPOTrainer`` from objects (a model, a dataset of
pairs, references, ``TrainingArguments``), as ``mrpo train`` makes one from a config file.

The inputs are first resolved into an ``MRPOConfig``, so a mistake is the one-line ``ConfigError`` or ``DataError`` a
config file would get, then built by ``assemble.assemble_trainer``, the code path of ``mrpo train``; the same data
and settings give the same numbers either way.

Two things are stored under ``cache_dir/snapshots/<content hash>/`` because the caches are keyed by what is on disk:
a model object's weights as passed (with its tokenizer), which the initialising reference is scored from before
training; and a ``processing_class`` given with a model id or path. The same objects give the same directory, so a
second build reuses the reference cache.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mrpo.config.overrides import INITIALISING_REFERENCE_NAME
from mrpo.config.schema import MRPOConfig
from mrpo.errors import ConfigError, DataError

SECTIONS = ("policy", "data", "loss", "lora", "diagnostics", "training")
"""The config sections ``build_trainer`` takes as keyword mappings (``loss={"beta": 0.1}``)."""
MEMORY_SOURCES = {"train": "train_dataset", "eval": "eval_dataset"}
"""What ``data.train`` / ``data.eval`` say for a dataset passed in memory: the argument its errors name."""
SNAPSHOT_DIR = "snapshots"


def build_trainer(
    model: Any = None,
    train_dataset: Any = None,
    *,
    references: Iterable[Any] | Mapping[str, str | os.PathLike] | None = None,
    args: Any = None,
    processing_class: Any = None,
    eval_dataset: Any = None,
    config: MRPOConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    **sections: Mapping[str, Any],
):
    """A ready ``MRPOTrainer`` (call ``.train()``), its reference cache filled.

    Args:
        model: the policy: a ``transformers.PreTrainedModel`` (trained as passed, not reloaded) or a model id/path.
        train_dataset: the pairs: a ``datasets.Dataset``, a list of dicts (standard, conversational or implicit
            rows), or a file / saved dataset / hub id as ``data.train`` takes.
        references: model ids/paths, or ``{name: id/path}``; the first is the initialising reference, the policy's
            start (with a model object: the object itself or its ``name_or_path``, scored from its weights as
            passed). Default: the policy's start alone (DPO).
        args: ``transformers.TrainingArguments``; a copy is used (``remove_unused_columns=False``). Default: the
            config's ``training`` section.
        processing_class: the policy's tokenizer. Default: the one saved with the model.
        eval_dataset: held-out pairs, as ``train_dataset``.
        config: an ``MRPOConfig`` to start from; the other arguments replace what it says.
        cache_dir: the reference caches (default: the config's, ``.cache/mrpo``).
        **sections: config sections as mappings: ``policy``, ``data``, ``loss``, ``lora``, ``diagnostics``,
            ``training`` (the last not with ``args``).
    """
    from mrpo.assemble import assemble_trainer
    from mrpo.splits import read_records

    raw = _raw_config(config, sections, args)
    if cache_dir is not None:
        raw["cache_dir"] = str(cache_dir)
    cache_root = Path(raw.get("cache_dir") or MRPOConfig.__dataclass_fields__["cache_dir"].default)
    records = _set_datasets(raw, train_dataset, eval_dataset)
    policy = _set_policy(raw, model, processing_class, cache_root, references)
    built = MRPOConfig.from_dict(raw)
    pairs = {split: read_records(built, split, rows) for split, rows in records.items()}
    arguments = built.training.to_training_arguments() if args is None else _copy_arguments(args)
    run = assemble_trainer(built, arguments, policy=policy, pairs=pairs, show_progress=show_progress)
    run.trainer.mrpo_config = built
    return run.trainer


def _raw_config(config: MRPOConfig | None, sections: Mapping[str, Any], args: Any) -> dict[str, Any]:
    """The config as plain data, with the keyword sections merged in key by key."""
    raw = config.to_dict() if config is not None else {}
    for name, values in sections.items():
        if name not in SECTIONS:
            raise ConfigError(
                f"build_trainer got an unknown argument {name!r}; config sections are {', '.join(SECTIONS)}",
                key=name,
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"'{name}' must be a mapping of its keys, got {values!r}", key=name)
        raw[name] = {**(raw.get(name) or {}), **values}
    if args is not None:
        if "training" in sections:
            raise ConfigError(
                "give the training arguments once: as args (a TrainingArguments) or as training={...}",
                key="training",
            )
        raw["training"] = {"output_dir": str(args.output_dir)}  # args itself is what trains
    return raw


def _set_datasets(raw: dict[str, Any], train: Any, held_out: Any) -> dict[str, Any]:
    """Point ``data.train`` / ``data.eval`` at the datasets; those in memory are returned by split (their rows)."""
    data = raw.setdefault("data", {})
    in_memory = {}
    for split, dataset in (("train", train), ("eval", held_out)):
        if dataset is None:
            continue
        if isinstance(dataset, (str, os.PathLike)):
            data[split] = str(dataset)
            continue
        if isinstance(dataset, Mapping) or not isinstance(dataset, Iterable):
            raise DataError(
                f"{MEMORY_SOURCES[split]} must be a datasets.Dataset, a list of dicts or a path, got "
                f"{type(dataset).__name__}"
                + (" (a DatasetDict: pick a split)" if isinstance(dataset, Mapping) else ""),
                source=MEMORY_SOURCES[split],
            )
        data[split] = MEMORY_SOURCES[split]
        in_memory[split] = dataset
    return in_memory


def _set_policy(
    raw: dict[str, Any], model: Any, processing_class: Any, cache_root: Path, references: Any
) -> Any:
    """Point ``policy.model`` (and the initialising reference) at the model; the model object to train, if one."""
    policy = raw.setdefault("policy", {})
    aliases = {policy.get("model")} - {None}  # what the config's first reference may call the start
    model_object = None
    if model is None and policy.get("model") is None:
        raise ConfigError(
            "build_trainer needs a model: a PreTrainedModel or a model id/path", key="policy.model"
        )
    if model is not None and not isinstance(model, (str, os.PathLike)):
        model_object = _check_model_object(model)
        aliases |= {model.name_or_path} - {""}
        tokenizer = processing_class or _tokenizer_of(model)
        policy["model"] = str(_snapshot(cache_root, model.save_pretrained, tokenizer.save_pretrained))
        policy["tokenizer"] = None
        if policy.get("attn_implementation") is None:  # the kernel it runs with decides "auto" padding-free
            policy["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    elif model is not None:
        policy["model"] = str(model)
    if model_object is None and processing_class is not None:
        policy["tokenizer"] = str(_snapshot(cache_root, processing_class.save_pretrained))
    if references is not None:
        raw["references"] = _reference_list(references, model_object, policy["model"])
    _point_initialising_reference(raw, aliases | {policy["model"]}, model_object is not None)
    return model_object


def _check_model_object(model: Any) -> Any:
    if hasattr(model, "peft_config"):
        raise ConfigError(
            "model is a PEFT model: pass its base model and lora={'enabled': True, ...} (the base, as passed, is the "
            "initialising reference)",
            key="policy.model",
        )
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ConfigError(
            f"model must be a transformers PreTrainedModel or a model id/path, got {type(model).__name__}",
            key="policy.model",
        )
    return model


def _tokenizer_of(model: Any) -> Any:
    from mrpo.models import load_tokenizer

    if not model.name_or_path:
        raise ConfigError(
            "the model object does not say where it was loaded from (name_or_path is empty): pass its tokenizer "
            "as processing_class",
            key="policy.tokenizer",
        )
    return load_tokenizer(model.name_or_path, role="policy")


def _snapshot(cache_root: Path, *save: Any) -> Path:
    """A directory under ``cache_root/snapshots/`` holding what the ``save`` functions write, named by its content."""
    root = cache_root / SNAPSHOT_DIR
    staging = root / f".staging-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        for save_to in save:
            save_to(str(staging))
        digest = hashlib.sha256()
        for file in sorted(path for path in staging.rglob("*") if path.is_file()):
            digest.update(str(file.relative_to(staging)).encode() + b"\0")
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        final = root / digest.hexdigest()[:20]
        if not final.exists():
            staging.rename(final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _reference_list(references: Any, model_object: Any, start: str) -> list[dict[str, Any]]:
    """``references`` as config entries: ``{name: path}`` as given; a list named from its paths, the first "init"."""
    if isinstance(references, (str, os.PathLike)):
        raise ConfigError(
            "references must be a list of model ids/paths or a {name: id/path} mapping, not one string",
            key="references",
        )
    if isinstance(references, Mapping):
        return [{"name": str(name), "model": _reference_model(model, model_object, start)}
                for name, model in references.items()]  # fmt: skip
    entries: list[dict[str, Any]] = []
    for index, model in enumerate(references):
        name = INITIALISING_REFERENCE_NAME if index == 0 else _name_from(model, index)
        taken = {entry["name"] for entry in entries}
        while name in taken:
            name = f"{name}-{index + 1}"
        entries.append({"name": name, "model": _reference_model(model, model_object, start)})
    return entries


def _reference_model(model: Any, model_object: Any, start: str) -> str:
    """A reference's model as a path; the policy's model object is its start (``policy.model``)."""
    if model is not None and model is model_object:
        return start
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(
            f"a reference must be a model id or path, got {type(model).__name__} (only the policy's own model "
            "object may be listed, as the first reference)",
            key="references",
        )
    return str(model)


def _name_from(model: Any, index: int) -> str:
    """A reference name from its path or hub id (``google/gemma-3-270m`` -> ``gemma-3-270m``)."""
    last = str(model).rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", last).lstrip("._-")[:64]
    return name or f"ref{index + 1}"


def _point_initialising_reference(raw: dict[str, Any], starts: set[str], from_object: bool) -> None:
    """The initialising reference reads the policy's start: the model and tokenizer ``policy`` now names.

    With a model object its start is its snapshot, so the first reference must name it (the object, its
    ``name_or_path``, or the model the config started from); given a model id/path the first is taken as written.
    """
    references = raw.get("references")
    policy = raw["policy"]
    if not references:
        return
    first = references[0]
    if first.get("model") not in starts:
        if from_object:
            raise ConfigError(
                f"references[0] is the initialising reference, the policy's start, but it names {first.get('model')!r}"
                " while the model passed is an object: list the model (or its name_or_path) first; it is scored from"
                " the object's weights as passed",
                key="references.0.model",
            )
        return
    references[0] = {**first, "model": policy["model"], "tokenizer": policy.get("tokenizer")}


def _copy_arguments(args: Any) -> Any:
    """The caller's ``TrainingArguments`` as mrpo trains with them, on a copy (theirs is left as it was)."""
    copied = copy.deepcopy(args)
    copied.remove_unused_columns = False  # the collator needs the pair columns the Trainer would strip
    return copied
