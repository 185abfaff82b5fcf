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
