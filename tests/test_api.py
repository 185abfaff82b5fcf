"""``mrpo.build_trainer``, the library path without the CLI: a model object or path, pairs in memory (a list of dicts
or a ``datasets.Dataset``), references of two families, the caller's TrainingArguments; the same numbers as
``mrpo train`` on the same data and settings, and the same one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import TrainingArguments

import mrpo
from mrpo.config.schema import load_config
from mrpo.errors import ConfigError, DataError
from mrpo.pipeline import run_train
from tiny_models import bpe_tokenizer, tiny_llama


def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    values = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 0.1,
        "optim": "sgd",
        "use_cpu": True,
        "disable_tqdm": True,
        "report_to": "none",
        "seed": 0,
        **overrides,
    }
    return TrainingArguments(**values)


def records(run_setup) -> list[dict]:
    return [json.loads(line) for line in run_setup["train"].read_text().splitlines()]


def first_losses(output_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def build(run_setup, name: str, dataset, **kwargs):
    """A trainer of a fresh tiny policy object (the weights saved in run_setup's llama dir) against it and gemma."""
    model = tiny_llama()
    kwargs.setdefault("references", [model, str(run_setup["gemma"])])
    trainer = mrpo.build_trainer(
        model=model,
        train_dataset=dataset,
        args=kwargs.pop("args", None) or arguments(run_setup["root"] / name),
        processing_class=bpe_tokenizer(),
        loss={"beta": 0.1},
        cache_dir=run_setup["root"] / "api-cache",
        show_progress=False,
        **kwargs,
    )
    return model, trainer


def test_a_model_object_and_a_list_of_dicts_train_against_two_families(run_setup):
    model, trainer = build(run_setup, "from-list", records(run_setup))
    assert trainer.model is model  # the object passed is the policy, not a reload
    start = tiny_llama().model.embed_tokens.weight
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    assert all(entry["alpha/ref1"] + entry["alpha/ref2"] == pytest.approx(1.0, abs=1e-6) for entry in logs)
    assert not torch.equal(model.model.embed_tokens.weight, start)  # it trained the caller's object
    names = [reference.name for reference in trainer.mrpo_config.references]
    assert names == ["init", "gemma"]
    # reference 1 was scored from the object's weights as passed, kept with its tokenizer under the cache
    snapshot = Path(trainer.mrpo_config.references[0].model)
    assert snapshot.parent == run_setup["root"] / "api-cache" / "snapshots"
    assert trainer.mrpo_config.policy.model == str(snapshot)


def test_a_datasets_dataset_gives_what_the_list_gives(run_setup):
    _, from_list = build(
        run_setup, "list-1", records(run_setup), args=arguments(run_setup["root"] / "list-1", max_steps=1)
    )
    from_list.train()
    pairs = Dataset.from_list(records(run_setup))
    _, trainer = build(
        run_setup, "dataset", pairs, args=arguments(run_setup["root"] / "dataset"), eval_dataset=pairs
    )
    assert len(trainer.eval_dataset) == len(pairs)  # held-out pairs in memory too (here: the same ones)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2] and all("alpha/ref2" in entry for entry in logs)
    assert first_losses(run_setup["root"] / "dataset")[0] == pytest.approx(
        first_losses(run_setup["root"] / "list-1")[0], abs=1e-6
    )
    # the same objects give the same snapshot directory, so the second build reused the reference cache
    assert trainer.mrpo_config.policy.model == from_list.mrpo_config.policy.model


def test_the_first_step_loss_is_mrpo_train_s_on_the_same_data_and_settings(run_setup):
    root = run_setup["root"]
    config = {
        "policy": {"model": str(run_setup["llama"])},
        "references": [
            {"name": "init", "model": str(run_setup["llama"])},
            {"name": "gemma", "model": str(run_setup["gemma"])},
        ],
        "data": {"train": str(run_setup["train"])},
        "loss": {"beta": 0.1},
        "training": {
            "output_dir": str(root / "cli-run"),
            "per_device_train_batch_size": 2,
            "max_steps": 1,
            "logging_steps": 1,
            "learning_rate": 0.1,
            "optim": "sgd",
            "use_cpu": True,
            "disable_tqdm": True,
            "save_strategy": "no",
        },
        "cache_dir": str(root / "cli-cache"),
    }
    path = root / "cli-run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run_train(load_config(path), show_progress=False)
    _, trainer = build(
        run_setup, "api-run", records(run_setup), args=arguments(root / "api-run", max_steps=1)
    )
    trainer.train()
    assert first_losses(root / "api-run")[0] == pytest.approx(first_losses(root / "cli-run")[0], abs=1e-6)


def test_the_callers_training_arguments_are_left_as_they_were(run_setup):
    args = arguments(run_setup["root"] / "untouched")
    assert args.remove_unused_columns is True  # transformers' default, which MRPO cannot train with
    before = args.to_dict()
    _, trainer = build(run_setup, "untouched", records(run_setup), args=args, references=None)
    assert args.to_dict() == before
    assert trainer.args is not args and trainer.args.remove_unused_columns is False
    assert [reference.name for reference in trainer.mrpo_config.references] == ["init"]  # no references: DPO


def test_a_row_missing_rejected_is_one_data_error_naming_the_row_and_field(run_setup):
    rows = records(run_setup)
    del rows[1]["rejected"]
    with pytest.raises(DataError) as caught:
        build(run_setup, "bad-row", rows)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("train_dataset, row index 1 (0-based), field 'rejected':")
    assert (caught.value.row, caught.value.field) == ("row index 1 (0-based)", "rejected")


def test_with_a_model_object_the_first_reference_must_be_its_start(run_setup):
    with pytest.raises(ConfigError, match=r"references\[0\] is the initialising reference") as caught:
        build(run_setup, "wrong-start", records(run_setup), references=[str(run_setup["gemma"])])
    assert caught.value.key == "references.0.model"
