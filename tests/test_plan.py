"""`mrpo train --dry-run`: the plan from the config alone (meta device), with its arithmetic checked by hand."""

from __future__ import annotations

import pytest

from mrpo.cli import main
from mrpo.config import MRPOConfig
from mrpo.plan import plan_training
from tiny_models import bpe_tokenizer, save_model_dir, tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model_dir(tiny_llama(), bpe_tokenizer(), tmp_path_factory.mktemp("plan") / "llama")


def config(llama_dir, **sections) -> MRPOConfig:
    raw = {
        "policy": {"model": str(llama_dir), "dtype": "bfloat16"},
        "data": {"train": "never-read.jsonl", "max_length": 100},
        "training": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3},
        **sections,
    }
    return MRPOConfig.from_dict(raw)


def test_counts_and_memory_by_hand(llama_dir):
    model = tiny_llama()
    parameters = sum(p.numel() for p in model.parameters())
    plan = plan_training(config(llama_dir), processes=2)
    assert plan.parameters == parameters and plan.trainable == parameters  # full fine-tuning
    assert (plan.layers, plan.hidden, plan.dtype) == (2, 32, "bfloat16")
    assert plan.pairs_per_step == 4 * 3 * 2 and plan.tokens_per_step == 2 * 24 * 100
    assert plan.tokens_per_forward == 2 * 4 * 100
    memory = plan.memory_gib()
    assert memory["weights"] == pytest.approx(parameters * 2 / 2**30)
    assert memory["gradients + optimizer"] == pytest.approx(3 * parameters * 2 / 2**30)
    assert memory["activations (one micro-batch)"] == pytest.approx(800 * 34 * 32 * 2 / 2**30)
    sharded = plan_training(config(llama_dir), processes=2, fsdp=True).memory_gib()
    assert sharded["weights"] == pytest.approx(memory["weights"] / 2)


def test_lora_counts_r_times_in_plus_out_per_targeted_layer(llama_dir):
    lora = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    plan = plan_training(config(llama_dir, lora=lora))
    # q_proj: 32 -> 32 (4 heads x 8); v_proj: 32 -> 16 (2 kv heads x 8); two layers.
    assert plan.trainable == 2 * (4 * (32 + 32) + 4 * (32 + 16))


def test_checkpointing_and_a_token_budget_shrink_the_activations(llama_dir):
    plain = plan_training(config(llama_dir)).memory_gib()["activations (one micro-batch)"]
    checkpointed = plan_training(
        config(llama_dir, training={"per_device_train_batch_size": 4, "gradient_checkpointing": True})
    ).memory_gib()["activations (one micro-batch)"]
    assert checkpointed == pytest.approx(800 * (2 * 32 * 2 + 34 * 32) / 2**30) and checkpointed < plain
    budget = plan_training(config(llama_dir, policy={"model": str(llama_dir), "micro_batch_tokens": 200}))
    assert budget.tokens_per_forward == 200


def test_dry_run_prints_the_plan_without_reading_data(llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output_dir, runs/mrpo, would land here
    path = tmp_path / "config.yaml"
    path.write_text(f"policy: {{model: {llama_dir}}}\ndata: {{train: {tmp_path / 'absent.jsonl'}}}\n")
    assert main(["train", str(path), "--dry-run", "--processes", "8", "--fsdp"]) == 0
    out = capsys.readouterr().out
    assert "8 with FSDP full sharding" in out and "memory per device (estimate" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # nothing written, no data read
