"""mrpo.fast_path: the rows, compilation and bucket chosen per device where the policy leaves them to "auto", each
choice overridden by its key, and the choice reaching the trainer's collator, the dry run and the precompute."""

from __future__ import annotations

import pytest

from mrpo.config.schema import PolicyConfig
from mrpo.fast_path import (
    DOCUMENT_AWARE_ATTENTION,
    choose_fast_path,
    padding_free_enabled,
    reference_rows_shared,
)


def policy(**settings) -> PolicyConfig:
    return PolicyConfig(**{"model": "m", **settings})


def test_padding_free_auto_packs_only_with_a_document_aware_kernel():
    for kernel in DOCUMENT_AWARE_ATTENTION:
        assert padding_free_enabled("auto", kernel)
    assert not padding_free_enabled("auto", "sdpa") and not padding_free_enabled("auto", None)
    assert padding_free_enabled(True, "sdpa") and not padding_free_enabled(False, "flex_attention")


@pytest.mark.parametrize(
    ("settings", "cuda", "rows", "compiled", "bucket"),
    [
        ({}, False, "prefix_shared", False, False),  # the CPU: prompts once, nothing compiled
        ({"attn_implementation": "eager"}, False, "prefix_shared", False, False),
        ({}, True, "padded", False, False),  # CUDA with sdpa: prefix-shared rows not measured there
        ({"attn_implementation": "flex_attention"}, True, "packed", True, True),  # the GPU fast path
        ({"attn_implementation": "flash_attention_2"}, True, "packed", True, True),
        ({"attn_implementation": "flex_attention"}, False, "packed", False, False),
        ({"attn_implementation": "flash_attention_2", "padding_free": False}, False, "padded", False, False),
        ({"attn_implementation": "flex_attention", "pad_to_multiple_of": 4096}, True, "packed", True, False),
        ({"prefix_shared": False}, False, "padded", False, False),
        ({"padding_free": True}, False, "packed", False, False),
        ({"prefix_shared": True}, True, "prefix_shared", False, False),
        ({"compile": True}, False, "prefix_shared", True, True),
        ({"attn_implementation": "flex_attention", "compile": False}, True, "packed", False, False),
    ],
)
def test_auto_settings_are_chosen_per_device_and_set_ones_kept(settings, cuda, rows, compiled, bucket):
    fast = choose_fast_path(policy(**settings), cuda=cuda)
    assert (fast.rows, fast.compile, fast.bucket) == (rows, compiled, bucket)
    assert len(fast.reasons) == 3 and fast.text().startswith("fast path: ")
    resolved = fast.apply(policy(**settings))
    assert "auto" not in (resolved.padding_free, resolved.prefix_shared, resolved.compile)
    assert choose_fast_path(resolved, cuda=cuda).rows == rows  # resolving twice changes nothing


def test_each_reason_says_whether_it_was_chosen_or_set():
    assert "auto: sdpa on the CPU" in choose_fast_path(policy(), cuda=False).reasons[0]
    assert "(set)" in choose_fast_path(policy(prefix_shared=False, padding_free=False), cuda=False).reasons[0]
    assert "compile off (auto: CPU)" in choose_fast_path(policy(), cuda=False).reasons[1]
    assert (
        "compile on (auto: CUDA with packed rows)"
        in choose_fast_path(policy(attn_implementation="flex_attention"), cuda=True).reasons[1]
    )


def test_references_share_prompts_on_the_cpu_unless_set():
    assert reference_rows_shared("auto", cuda=False) and not reference_rows_shared("auto", cuda=True)
    assert reference_rows_shared(True, cuda=True) and not reference_rows_shared(False, cuda=False)


def test_the_trainer_gets_the_cpu_fast_path_by_default(tmp_path):
    """``build_trainer`` with the policy section left alone: prefix-shared rows on the CPU, and the same first-step
    loss as padded rows (float rounding)."""
    from transformers import TrainingArguments

    import mrpo
    from tiny_models import bpe_tokenizer, tiny_llama

    pairs = [
        {"prompt": f"question {i} about the sky", "chosen": "blue and bright", "rejected": f"green {i}"}
        for i in range(6)
    ]
    losses = {}
    for name, settings in {"auto": {}, "padded": {"prefix_shared": False}}.items():
        trainer = mrpo.build_trainer(
            model=tiny_llama(),
            train_dataset=pairs,
            args=TrainingArguments(
                output_dir=str(tmp_path / name), max_steps=1, report_to="none", use_cpu=True
            ),
            processing_class=bpe_tokenizer(),
            policy=settings,
            cache_dir=tmp_path / "cache",
            show_progress=False,
        )
        collator = trainer.data_collator
        assert collator.prefix_shared is (name == "auto") and not collator.padding_free
        batch = collator([trainer.train_dataset[i] for i in range(4)])
        losses[name] = float(trainer.compute_loss(trainer.model.eval(), batch))
    assert losses["auto"] == pytest.approx(losses["padded"], abs=1e-5)


def test_the_dry_run_says_what_was_chosen(tmp_path):
    from mrpo.config.schema import DataConfig, MRPOConfig
    from mrpo.plan import plan_training
    from tiny_models import bpe_tokenizer, save_model_dir, tiny_llama

    model_dir = save_model_dir(tiny_llama(), bpe_tokenizer(), tmp_path / "policy")
    config = MRPOConfig(
        policy=policy(model=str(model_dir)), data=DataConfig(train=str(tmp_path / "train.jsonl"))
    )
    text = plan_training(config, cuda=False).text()
    assert "fast path: prefix-shared rows (auto: sdpa on the CPU" in text
    assert "compile off (auto: CPU)" in text


def _without_mask_support():
    """A tiny Llama that says it takes no custom attention mask, as a recurrent model (Mamba, RWKV, xLSTM) or
    one with its own 2D-mask bias (Bloom) says."""
    from tiny_models import tiny_llama

    model = tiny_llama()
    model.__class__ = type("NoMaskLlama", (type(model),), {"_supports_attention_backend": False})
    return model


def test_a_model_that_drops_the_4d_mask_gets_padded_rows_under_auto_and_an_error_when_set():
    from mrpo.errors import ConfigError
    from mrpo.fast_path import use_shared_rows
    from mrpo.logprobs import prefix_shared_refusal
    from tiny_models import tiny_gemma3, tiny_llama

    assert prefix_shared_refusal(tiny_llama()) is None and prefix_shared_refusal(tiny_gemma3()) is None
    refusal = prefix_shared_refusal(_without_mask_support())
    assert refusal == "NoMaskLlama does not take a custom 4D attention mask"
    assert use_shared_rows("auto", True, None, key="policy.prefix_shared")
    assert not use_shared_rows("auto", True, refusal, key="policy.prefix_shared")
    assert not use_shared_rows("auto", False, None, key="policy.prefix_shared")
    with pytest.raises(ConfigError, match="policy.prefix_shared is true, but NoMaskLlama does not take"):
        use_shared_rows(True, True, refusal, key="policy.prefix_shared")


def test_the_trainer_falls_back_to_padded_rows_for_such_a_model(tmp_path):
    from transformers import TrainingArguments

    import mrpo
    from tiny_models import bpe_tokenizer

    pairs = [{"prompt": f"question {i}", "chosen": "blue", "rejected": f"green {i}"} for i in range(4)]
    trainer = mrpo.build_trainer(
        model=_without_mask_support(),
        train_dataset=pairs,
        args=TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to="none", use_cpu=True),
        processing_class=bpe_tokenizer(),
        cache_dir=tmp_path / "cache",
        show_progress=False,
    )
    assert not trainer.data_collator.prefix_shared and not trainer.data_collator.padding_free
