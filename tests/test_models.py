"""Tests of mrpo.models' load-time rules: the dtype "auto" stands for, and LoRA targets checked against the
model's module names (loading itself is tested where it is used: tests/test_errors.py, test_references.py, ...)."""

import pytest

from mrpo.config.schema import LoraConfig
from mrpo.errors import ConfigError
from mrpo.models import check_lora_targets, resolve_dtype


def test_resolve_dtype():
    assert resolve_dtype("auto", cuda=True) == "bfloat16"
    assert resolve_dtype("auto", cuda=False) == "float32"
    assert resolve_dtype("float16", cuda=False) == "float16"


# --- LoRA targets against a model's module names -----------------------------------------------------------------

LLAMA_LINEAR_MODULES = [
    f"model.layers.{layer}.{block}.{projection}"
    for layer in range(2)
    for block, projections in (
        ("self_attn", "q_proj k_proj v_proj o_proj"),
        ("mlp", "gate_proj up_proj down_proj"),
    )
    for projection in projections.split()
] + ["lm_head"]


def test_lora_targets_present_pass():
    check_lora_targets(LoraConfig(enabled=True, target_modules=["q_proj", "v_proj"]), LLAMA_LINEAR_MODULES)
    check_lora_targets(LoraConfig(enabled=True, target_modules=["self_attn.q_proj"]), LLAMA_LINEAR_MODULES)
    check_lora_targets(LoraConfig(enabled=True), LLAMA_LINEAR_MODULES)  # "all-linear"
    check_lora_targets(LoraConfig(enabled=False, target_modules=["c_attn"]), LLAMA_LINEAR_MODULES)  # LoRA off


def test_missing_lora_target_lists_what_the_model_has():
    config = LoraConfig(enabled=True, target_modules=["q_proj", "c_attn", "qproj"])
    with pytest.raises(ConfigError) as caught:
        check_lora_targets(config, LLAMA_LINEAR_MODULES)
    message = str(caught.value)
    assert "'lora.target_modules'" in message and "['q_proj', 'c_attn', 'qproj']" in message
    assert "no module named 'c_attn', 'qproj'" in message
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message
    with pytest.raises(ConfigError, match="did you mean 'q_proj'"):
        check_lora_targets(LoraConfig(enabled=True, target_modules=["qproj"]), LLAMA_LINEAR_MODULES)


# --- compiled layers meeting token-budget micro-batches -----------------------------------------------------------


def test_compile_with_a_budget_and_no_chosen_bucket_warns_once(caplog, monkeypatch):
    import logging

    import mrpo.models
    from mrpo.config.schema import DataConfig, MRPOConfig, PolicyConfig
    from mrpo.models import load_policy, warn_compile_without_bucket
    from tiny_models import tiny_llama

    monkeypatch.setattr(mrpo.models, "_COMPILE_WARNINGS_SAID", set())
    policy = PolicyConfig(model="tiny", compile=True, micro_batch_tokens=4096)
    config = MRPOConfig(policy=policy, data=DataConfig(train="pairs.jsonl"))
    with caplog.at_level(logging.WARNING, logger="mrpo.models"):
        load_policy(config, model=tiny_llama())  # compiles lazily: nothing runs until a forward
        load_policy(config, model=tiny_llama())
    (record,) = caplog.records  # once per process
    for key in ("policy.compile", "policy.micro_batch_tokens=4096", "policy.pad_to_multiple_of"):
        assert key in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mrpo.models"):
        warn_compile_without_bucket(
            PolicyConfig(model="m", compile=True, micro_batch_tokens=4096, pad_to_multiple_of=1)
        )
        assert "exact lengths" in caplog.records[-1].getMessage()
        for quiet in (
            PolicyConfig(model="m", compile=True, micro_batch_tokens=4096, pad_to_multiple_of=256),
            PolicyConfig(model="m", compile=True),
            PolicyConfig(model="m", micro_batch_tokens=4096),
        ):
            warn_compile_without_bucket(quiet)
    assert len(caplog.records) == 1
