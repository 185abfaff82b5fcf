"""`mrpo train --dry-run`: the plan from the config alone (meta device), with its arithmetic checked by hand."""

from __future__ import annotations

import pytest
import torch

from mrpo.cli import main
from mrpo.config.schema import MRPOConfig
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
    assert (plan.intermediate, plan.kv_width, plan.vocabulary) == (64, 16, model.config.vocab_size)
    assert plan.pairs_per_step == 4 * 3 * 2 and plan.tokens_per_step == 2 * 24 * 100
    assert plan.tokens_per_forward == 2 * 4 * 100
    memory = plan.memory_gib()
    assert memory["weights"] == pytest.approx(parameters * 2 / 2**30)
    assert memory["gradients + optimizer"] == pytest.approx(3 * parameters * 2 / 2**30)
    per_layer = (11 * 32 + 4 * 16 + 4 * 64) * 2  # bytes per token: 11 h + 4 kv + 4 i elements
    assert memory["activations (one micro-batch)"] == pytest.approx(
        800 * (2 * per_layer + 3 * 32 * 2) / 2**30
    )
    assert memory["LM head logits"] == pytest.approx(3 * 800 * model.config.vocab_size * 4 / 2**30)
    sharded = plan_training(config(llama_dir), processes=2, fsdp=True).memory_gib()
    assert sharded["weights"] == pytest.approx(memory["weights"] / 2)


def test_auto_dtype_is_the_planned_devices_and_activations_grow_with_batch_times_length(llama_dir):
    auto = {"model": str(llama_dir), "dtype": "auto"}
    on_cpu = plan_training(config(llama_dir, policy=auto), cuda=False)
    on_gpu = plan_training(config(llama_dir, policy=auto), cuda=True)
    assert (on_cpu.dtype, on_gpu.dtype) == (
        "float32",
        "bfloat16",
    )  # auto: float32 on CPU, as policy.dtype says
    assert on_cpu.memory_gib()["weights"] == pytest.approx(2 * on_gpu.memory_gib()["weights"])
    used = config(llama_dir, policy=auto, training={"use_cpu": True})
    assert (
        plan_training(used).dtype == "float32"
    )  # training.use_cpu plans for the CPU whatever the machine has

    def activations(pairs, length):
        section = {"per_device_train_batch_size": pairs}
        raw = config(llama_dir, training=section, data={"train": "x.jsonl", "max_length": length})
        return plan_training(raw, cuda=False).memory_gib()["activations (one micro-batch)"]

    assert activations(8, 100) == pytest.approx(2 * activations(4, 100))
    assert activations(4, 200) == pytest.approx(2 * activations(4, 100))


def saved_activation_bytes(model, input_ids) -> int:
    """Bytes of the tensors a training forward saves for its backward pass (each storage once, weights aside)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), logits_to_keep=1)
    return sum(saved.values())


@pytest.mark.parametrize("lora", [False, True])
def test_the_activation_estimate_matches_what_a_training_forward_saves(llama_dir, lora):
    from mrpo.config.schema import LoraConfig
    from mrpo.models import add_lora

    pairs, length = 4, 96
    sections = {
        "data": {"train": "x.jsonl", "max_length": length},
        "training": {"per_device_train_batch_size": pairs},
    }
    if lora:
        sections["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    plan = plan_training(config(llama_dir, policy={"model": str(llama_dir), "dtype": "float32"}, **sections))
    model = tiny_llama().train()
    if lora:
        model = add_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    input_ids = torch.randint(0, model.config.vocab_size, (2 * pairs, length))
    measured = saved_activation_bytes(model, input_ids)
    assert 0.67 < plan.activation_bytes() / measured < 1.5, (
        plan.activation_bytes(),
        measured,
    )  # 1.2-1.25 here


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
    one_layer = (11 * 32 + 4 * 16 + 4 * 64) * 2  # recomputed in the backward pass, one layer at a time
    assert checkpointed == pytest.approx(800 * (2 * 32 * 2 + one_layer + 3 * 32 * 2) / 2**30)
    assert checkpointed < plain
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
