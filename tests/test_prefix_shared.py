"""Prefix-shared rows (one row per pair, its prompt computed once) give the padded path's log-probs.

Exactness, float32 on CPU, within 1e-5 nats (the issue's goal): the policy's log-probs and the gradients of a loss
on them, the collator + ``MRPOTrainer.compute_loss`` (and a few training steps), the reference precompute and the
held-out evaluation. The tokenizers are the suite's own (tests/tiny_models.py): the SmolLM2-like byte-level BPE
with a ChatML template, the Gemma-like character tokenizer without a template and with a Gemma-like one, and the
BPE again under a Llama whose head has a 32,000-row vocabulary (no 32k tokenizer is built in the suite; the larger
head is what changes the log-softmax). Besides the tokenizers' pairs: a pair whose chosen and rejected prompts
tokenize differently (the shared prefix is shorter than the prompt), pairs that share only their first token
(BOS) or nothing, and batches whose rows are padded.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

from mrpo.batching import (
    CHOSEN,
    FILLER,
    PREFIX,
    REJECTED,
    pad_batch,
    prefix_shared_attention,
    prefix_shared_batch,
    prefix_shared_length,
    shared_prefix_length,
)
from mrpo.collator import PreferenceCollator, PreferenceDataset
from mrpo.config.schema import PolicyConfig, ReferenceConfig
from mrpo.data.token_store import TokenizedPair, TokenizedPairs, TokenizedSequence
from mrpo.data.tokenization import ModelView
from mrpo.errors import ConfigError
from mrpo.evaluation import score_split
from mrpo.logprobs import SequenceLogps, prefix_shared_masks, prefix_shared_sequence_logps, sequence_logps
from mrpo.references import precompute, score_pairs
from mrpo.trainer import MRPOTrainer
from tiny_models import (
    GEMMA_LIKE_TEMPLATE,
    bpe_tokenizer,
    char_tokenizer,
    conversational_pairs,
    save_model_dir,
    standard_pairs,
    tiny_gemma3,
    tiny_llama,
)

ATOL, RTOL = 1e-5, 1e-6
"""1e-5 nats, or one float32 rounding of a sum near 100 nats (long character-level texts), as tests/test_logprobs.py."""

SETUPS = {
    "smollm2-chatml": (tiny_llama, bpe_tokenizer),
    "gemma-plain": (tiny_gemma3, char_tokenizer),
    "gemma-chat": (tiny_gemma3, lambda: char_tokenizer(GEMMA_LIKE_TEMPLATE)),
    "llama-32k": (lambda: tiny_llama(32_000), bpe_tokenizer),
}


def differing_prompts(tokenizer) -> TokenizedPair:
    """Prompt + completion tokenized whole, as a naive tokenizer call would: the BPE merges the prompt's last "\\n"
    with the chosen answer's first into "\\n\\n", so the two prompts differ in their last token. Character
    tokenizers never merge; there the rejected prompt's last token is changed by hand."""
    prompt, chosen, rejected = "Question: What colour is the sky?\n", "\nThe sky is blue.", " Green."
    prompt_length = len(tokenizer(prompt)["input_ids"])
    chosen_ids, rejected_ids = (tuple(tokenizer(prompt + text)["input_ids"]) for text in (chosen, rejected))
    if chosen_ids[prompt_length - 1] == rejected_ids[prompt_length - 1]:
        last = prompt_length - 1
        rejected_ids = (*rejected_ids[:last], rejected_ids[last] - 1, *rejected_ids[last + 1 :])
    pair = TokenizedPair(
        "differing-prompts",
        TokenizedSequence(chosen_ids, prompt_length),
        TokenizedSequence(rejected_ids, prompt_length),
    )
    assert shared_prefix_length(pair.chosen, pair.rejected) == prompt_length - 1
    return pair


def unrelated(first: TokenizedPair, second: TokenizedPair, *, shared: int) -> TokenizedPair:
    """``first``'s chosen against ``second``'s rejected, sharing exactly ``shared`` (0 or 1) leading tokens."""
    chosen, other = first.chosen, second.rejected
    head = chosen.input_ids[0] if shared else (chosen.input_ids[0] + 1) % 90 + 5
    rejected = TokenizedSequence((head, *other.input_ids[1:]), other.prompt_length)
    assert rejected.input_ids[1] != chosen.input_ids[1]
    pair = TokenizedPair(f"shared-{shared}", chosen, rejected)
    assert shared_prefix_length(pair.chosen, pair.rejected) == shared
    return pair


def tokenized_pairs(tokenizer) -> list[TokenizedPair]:
    view = ModelView(tokenizer)
    texts = standard_pairs() + (conversational_pairs() if tokenizer.chat_template else [])
    pairs = [view.tokenize(pair) for pair in texts]
    return [*pairs, differing_prompts(tokenizer), unrelated(pairs[0], pairs[2], shared=1)] + [
        unrelated(pairs[1], pairs[2], shared=0)
    ]


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request):
    make_model, make_tokenizer = SETUPS[request.param]
    tokenizer = make_tokenizer()
    return SimpleNamespace(
        name=request.param, model=make_model(), view=ModelView(tokenizer), pairs=tokenized_pairs(tokenizer)
    )


def padded_logps(model, view, pairs) -> SequenceLogps:
    sequences = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    batch = pad_batch(sequences, pad_token_id=view.pad_token_id, padding_side=view.padding_side)
    return sequence_logps(model, **batch)


def shared_logps(model, view, pairs, **options) -> SequenceLogps:
    batch = prefix_shared_batch(
        [(pair.chosen, pair.rejected) for pair in pairs], pad_token_id=view.pad_token_id, **options
    )
    return prefix_shared_sequence_logps(
        model,
        batch["input_ids"],
        batch["position_ids"],
        batch["segment_ids"],
        batch["prediction_positions"],
        batch["prediction_targets"],
        batch["prediction_owners"],
        num_sequences=2 * len(pairs),
    )


# ---------------------------------------------------------------------------------------------------------------
# The rows and the mask, on the host


def test_the_documented_row():
    chosen, rejected = TokenizedSequence((5, 6, 7), 2), TokenizedSequence((5, 6, 8, 9), 2)
    batch = prefix_shared_batch([(chosen, rejected)])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3]]
    assert batch["segment_ids"].tolist() == [[PREFIX, PREFIX, CHOSEN, REJECTED, REJECTED]]
    assert batch["prediction_positions"].tolist() == [[0, 0, 0], [1, 1, 3]]
    assert batch["prediction_targets"].tolist() == [7, 8, 9]
    assert batch["prediction_owners"].tolist() == [0, 1, 1]
    assert prefix_shared_length(chosen, rejected) == 5


def test_rows_without_a_shared_prefix_and_padding_rows():
    # Pair 0 shares nothing; pair 1 shares its prompt (3 tokens) and is padded to the multiple of 8.
    pairs = [
        (TokenizedSequence((1, 2, 3), 1), TokenizedSequence((4, 5), 1)),
        (TokenizedSequence((7, 7, 7, 8), 3), TokenizedSequence((7, 7, 7, 9), 3)),
    ]
    batch = prefix_shared_batch(pairs, pad_token_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [7, 7, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"][0, :5].tolist() == [0, 1, 2, 0, 1]
    assert batch["segment_ids"][0].tolist() == [CHOSEN] * 3 + [REJECTED] * 2 + [FILLER] * 3
    # Sequences 0, 1 (chosen), 2, 3 (rejected): every completion token, predicted by its own sequence's previous one.
    owners, targets = batch["prediction_owners"].tolist(), batch["prediction_targets"].tolist()
    assert sorted(zip(owners, targets, strict=True)) == [(0, 2), (0, 3), (1, 8), (2, 5), (3, 9)]
    rows, cols = batch["prediction_positions"].tolist()
    assert dict(zip(targets, zip(rows, cols, strict=True), strict=True)) == {
        2: (0, 0),
        3: (0, 1),
        5: (0, 3),
        8: (1, 2),
        9: (1, 2),
    }
    with pytest.raises(ValueError, match="no prompt token"):
        prefix_shared_batch([(TokenizedSequence((1, 2), 0), TokenizedSequence((1, 3), 1))])


def test_the_rejected_tail_never_sees_the_chosen_tail_and_no_query_is_fully_masked():
    pairs = [(TokenizedSequence((5, 6, 7, 7), 2), TokenizedSequence((5, 6, 8), 2))]
    segments = prefix_shared_batch(pairs, pad_to_multiple_of=8)["segment_ids"]
    allowed = prefix_shared_attention(segments)[0, 0]
    assert allowed.shape == (8, 8)
    assert allowed.tril().equal(allowed)  # causal
    assert allowed.any(dim=1).all()  # padding queries see at least themselves
    chosen, rejected, filler = (segments[0] == s for s in (CHOSEN, REJECTED, FILLER))
    assert not allowed[rejected][:, chosen].any()
    assert not allowed[~filler][:, filler].any()
    assert allowed[rejected][:, segments[0] == PREFIX].all()


def test_flash_attention_and_unknown_layer_types_are_refused():
    model = tiny_llama()
    segments = torch.zeros(1, 4, dtype=torch.long)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4D mask"):
        prefix_shared_masks(model, segments, segments)
    model = tiny_llama()
    model.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        prefix_shared_masks(model, segments, segments)


# ---------------------------------------------------------------------------------------------------------------
# The policy: log-probs and gradients


def test_log_probs_equal_the_padded_path(setup):
    with torch.no_grad():
        expected = padded_logps(setup.model, setup.view, setup.pairs)
        for options in ({}, {"pad_to_multiple_of": 64}):
            result = shared_logps(setup.model, setup.view, setup.pairs, **options)
            torch.testing.assert_close(result.logps, expected.logps, atol=ATOL, rtol=RTOL)
            assert result.token_counts.tolist() == expected.token_counts.tolist()
        # One pair per batch: no padding row at all.
        alone = torch.stack(
            [shared_logps(setup.model, setup.view, [pair]).logps for pair in setup.pairs], dim=1
        )
    torch.testing.assert_close(alone.flatten(), expected.logps, atol=ATOL, rtol=RTOL)


def test_gradients_equal_the_padded_paths(setup):
    model = copy.deepcopy(setup.model).train()
    weights = torch.linspace(-1.0, 1.0, 2 * len(setup.pairs))
    grads = []
    for compute in (padded_logps, shared_logps):
        model.zero_grad()
        (weights * compute(model, setup.view, setup.pairs).logps).sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    padded, shared = grads
    assert padded.keys() == shared.keys() and padded
    for name, grad in shared.items():
        torch.testing.assert_close(grad, padded[name], atol=ATOL, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Training: the collator and MRPOTrainer.compute_loss


def dataset_of(pairs) -> PreferenceDataset:
    generator = torch.Generator().manual_seed(0)
    chosen = -20 - 10 * torch.rand(2, len(pairs), generator=generator)
    rejected = -20 - 10 * torch.rand(2, len(pairs), generator=generator)
    return PreferenceDataset(pairs, chosen, rejected)


def trainer_for(model, dataset, collator, output_dir) -> MRPOTrainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return MRPOTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)


def test_compute_loss_and_its_gradients_equal_the_padded_batches(setup, tmp_path):
    dataset = dataset_of(setup.pairs)
    examples = [dataset[i] for i in range(len(dataset))]
    model = copy.deepcopy(setup.model).train()
    results = []
    for prefix_shared in (False, True):
        collator = PreferenceCollator(
            pad_token_id=setup.view.pad_token_id,
            padding_side=setup.view.padding_side,
            prefix_shared=prefix_shared,
        )
        batch = collator(examples)
        assert ("segment_ids" in batch) == prefix_shared
        trainer = trainer_for(model, dataset, collator, tmp_path / str(prefix_shared))
        model.zero_grad()
        loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), outputs["chosen_rewards"].detach(), batch["num_tokens"], grads))
    (loss, rewards, tokens, grads), (shared_loss, shared_rewards, shared_tokens, shared_grads) = results
    torch.testing.assert_close(shared_loss, loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(shared_rewards, rewards, atol=ATOL, rtol=RTOL)
    assert shared_tokens == tokens  # counted as TRL counts: prompt + chosen + prompt + rejected
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, grads[name], atol=ATOL, rtol=1e-5, msg=name)


def test_micro_batches_of_prefix_shared_rows_split_by_row_length():
    pairs = tokenized_pairs(bpe_tokenizer())
    dataset = dataset_of(pairs)
    examples = [dataset[i] for i in range(len(dataset))]
    rows = [prefix_shared_length(pair.chosen, pair.rejected) for pair in pairs]
    collator = PreferenceCollator(pad_token_id=0, prefix_shared=True, micro_batch_tokens=2 * max(rows))
    split = collator(examples)["micro_batches"]
    assert len(split) > 1
    for batch in split:
        assert batch["input_ids"].numel() <= 2 * max(rows)
    assert sum(batch["loss_weight"] for batch in split) == pytest.approx(1.0)
    assert sorted(pair for batch in split for pair in batch["pair_ids"]) == sorted(
        e["pair_id"] for e in examples
    )
    with pytest.raises(ValueError, match="choose one"):
        PreferenceCollator(pad_token_id=0, prefix_shared=True, padding_free=True)


def test_training_steps_equal_the_padded_ones(tmp_path):
    pairs = tokenized_pairs(bpe_tokenizer())
    dataset, view = dataset_of(pairs), ModelView(bpe_tokenizer())
    start, trained = tiny_llama(), []
    for prefix_shared in (False, True):
        model = copy.deepcopy(start).train()
        collator = PreferenceCollator(pad_token_id=view.pad_token_id, prefix_shared=prefix_shared)
        trainer_for(model, dataset, collator, tmp_path / str(prefix_shared)).train()
        trained.append(dict(model.named_parameters()))
    moved = max((trained[0][name] - p).abs().max().item() for name, p in start.named_parameters())
    assert moved > 1e-3
    for name, value in trained[1].items():
        torch.testing.assert_close(value, trained[0][name], atol=1e-5, rtol=1e-5, msg=name)


def test_build_trainer_gives_the_collator_the_setting_and_trains_like_padded(run_setup, tmp_path):
    import json

    import mrpo

    rows = [json.loads(line) for line in run_setup["train"].read_text().splitlines()]
    losses = []
    for prefix_shared in (False, True):
        trainer = mrpo.build_trainer(
            model=str(run_setup["llama"]),
            train_dataset=rows,
            args=TrainingArguments(
                output_dir=str(tmp_path / str(prefix_shared)),
                per_device_train_batch_size=2,
                max_steps=2,
                logging_steps=1,
                learning_rate=0.1,
                optim="sgd",
                use_cpu=True,
                disable_tqdm=True,
                report_to="none",
                seed=0,
            ),
            processing_class=bpe_tokenizer(),
            references=[str(run_setup["llama"]), str(run_setup["gemma"])],
            policy={"prefix_shared": prefix_shared},
            cache_dir=tmp_path / "cache",
            show_progress=False,
        )
        assert trainer.data_collator.prefix_shared is prefix_shared and not trainer.data_collator.padding_free
        trainer.train()
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)


def test_the_policy_setting_refuses_two_layouts_and_flash_attention():
    assert PolicyConfig(model="m").prefix_shared == "auto"  # chosen per device (mrpo.fast_path)
    PolicyConfig(model="m", prefix_shared="auto", attn_implementation="flash_attention_2")  # auto gives way
    PolicyConfig(model="m", prefix_shared=True)  # padding_free "auto" gives way
    with pytest.raises(ConfigError, match="choose one row layout"):
        PolicyConfig(model="m", prefix_shared=True, padding_free=True)
    with pytest.raises(ConfigError, match="4D mask"):
        PolicyConfig(model="m", prefix_shared=True, attn_implementation="flash_attention_2")


def test_a_run_saved_before_the_setting_resumes_with_it_on_or_off(tmp_path):
    import yaml

    from mrpo.config.schema import MRPOConfig
    from mrpo.preflight import check_resumable

    def config(prefix_shared: bool) -> MRPOConfig:
        return MRPOConfig.from_dict(
            {
                "policy": {"model": "m", "prefix_shared": prefix_shared},
                "references": [{"name": "init", "model": "m", "prefix_shared": prefix_shared}],
                "data": {"train": "pairs.jsonl"},
            }
        )

    saved = config(False).to_dict()
    del saved["policy"]["prefix_shared"], saved["references"][0]["prefix_shared"]  # as an older run saved it
    saved_file = tmp_path / "mrpo_config.yaml"
    saved_file.write_text(yaml.safe_dump(saved), encoding="utf-8")
    for prefix_shared in (False, True):  # how the log-probs are computed, not what: no refusal
        check_resumable(saved_file, config(prefix_shared), {})


# ---------------------------------------------------------------------------------------------------------------
# The reference precompute and the held-out evaluation


def test_score_pairs_and_evaluation_equal_the_padded_path(setup):
    pairs = TokenizedPairs(setup.pairs)
    padded = score_pairs(setup.model, setup.view, pairs, 256, lambda n: None)
    seen = []
    shared = score_pairs(setup.model, setup.view, pairs, 256, seen.append, prefix_shared=True)
    torch.testing.assert_close(shared[0], padded[0], atol=ATOL, rtol=RTOL)
    assert shared[1].tolist() == padded[1].tolist()
    assert sum(seen) == len(pairs) and len(seen) > 1  # a budget of 256 tokens makes several batches
    prepared = SimpleNamespace(dataset=dataset_of(pairs), views=SimpleNamespace(policy=setup.view))
    evaluated = score_split(setup.model, prepared, show_progress=False, prefix_shared=True)
    torch.testing.assert_close(evaluated[0], padded[0], atol=ATOL, rtol=RTOL)


def test_precompute_fills_the_same_store_with_the_same_numbers(tmp_path):
    from mrpo.data.sources import pairs_from_records
    from mrpo.data.tokenization import tokenize_for_models

    directory = save_model_dir(tiny_gemma3(), char_tokenizer(GEMMA_LIKE_TEMPLATE), tmp_path / "gemma-chat")
    records = [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in conversational_pairs()
    ]
    pairs = pairs_from_records(records)
    caches = []
    for prefix_shared in (False, True):
        spec = ReferenceConfig(name="ref", model=str(directory), dtype="float32", prefix_shared=prefix_shared)
        view = ModelView(char_tokenizer(GEMMA_LIKE_TEMPLATE), name="ref")
        tokens = tokenize_for_models(pairs, [view], max_length=None)
        root = Path(tmp_path / f"cache-{prefix_shared}")
        cache = precompute([spec], [view], tokens.per_view, root, device="cpu", show_progress=False)
        caches.append((cache.stores[0].directory.name, cache.columns(tokens.pair_ids)))
    (padded_store, padded), (shared_store, shared) = caches
    assert shared_store == padded_store  # the layout is not part of the store key
    for name in ("reference_chosen_logps", "reference_rejected_logps"):
        torch.testing.assert_close(shared[name], padded[name], atol=ATOL, rtol=RTOL)
