"""Tests of mrpo.logprobs: the chunked hidden-state path against the naive full-logits loop, and TRL parity."""

import pytest
import torch

from mrpo import logprobs
from mrpo.batching import pack_sequences, pad_batch
from mrpo.data.token_store import TokenizedSequence
from mrpo.data.tokenization import ModelView
from mrpo.logprobs import sequence_logps
from tiny_models import (
    bpe_tokenizer,
    char_tokenizer,
    conversational_pairs,
    standard_pairs,
    tiny_gemma3,
    tiny_llama,
)

# fp32 tolerance: 1e-5 nats, or one float32 rounding (rtol 1e-6) of sums near 100 nats (long char-level texts).
FAMILIES = {
    "llama": (tiny_llama, bpe_tokenizer),
    "gemma3": (tiny_gemma3, char_tokenizer),
}


def sequences_for(tokenizer) -> list[TokenizedSequence]:
    view = ModelView(tokenizer)
    return [
        s for pair in standard_pairs() for s in (view.tokenize(pair).chosen, view.tokenize(pair).rejected)
    ]


def naive_logps(model, sequences) -> torch.Tensor:
    """One sequence at a time, no padding, the model's own full logits: the definition of the quantity."""
    totals = []
    for sequence in sequences:
        ids = torch.tensor([sequence.input_ids])
        logps = model(ids, use_cache=False).logits.float().log_softmax(-1)[0]
        targets = ids[0, sequence.prompt_length :]
        positions = torch.arange(sequence.prompt_length - 1, len(sequence.input_ids) - 1)
        totals.append(logps[positions, targets].sum())
    return torch.stack(totals)


def batched_logps(model, sequences, *, pad_token_id=0, padding_side="right", chunk_size=None):
    batch = pad_batch(sequences, pad_token_id=pad_token_id, padding_side=padding_side)
    return sequence_logps(model, **batch, chunk_size=chunk_size)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    make_model, make_tokenizer = FAMILIES[request.param]
    tokenizer = make_tokenizer()
    return make_model(), tokenizer, sequences_for(tokenizer)


def test_matches_the_naive_loop(family):
    model, tokenizer, sequences = family
    with torch.no_grad():
        expected = naive_logps(model, sequences)
        view = ModelView(tokenizer)
        result = batched_logps(
            model, sequences, pad_token_id=view.pad_token_id, padding_side=view.padding_side
        )
    assert result.logps.dtype == torch.float32
    torch.testing.assert_close(result.logps, expected, atol=1e-5, rtol=1e-6)
    assert result.token_counts.tolist() == [s.completion_length for s in sequences]


def test_invariant_to_batch_composition_padding_side_and_chunk_size(family):
    model, _, sequences = family
    shortest = min(sequences, key=lambda s: len(s.input_ids))
    with torch.no_grad():
        alone = batched_logps(model, [shortest]).logps[0]
        results = [
            batched_logps(model, [shortest, *sequences], padding_side=side, chunk_size=chunk).logps
            for side in ("left", "right")
            for chunk in (1, 7, 100_000)
        ]
    for result in results:
        torch.testing.assert_close(result[0], alone, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(result, results[0], atol=1e-5, rtol=1e-6)


def test_the_default_chunk_is_sized_by_the_vocabulary():
    assert logprobs.default_chunk_size(262_144) == 256  # Gemma-3: 256 MiB of float32 logits a chunk
    assert logprobs.default_chunk_size(32_000) == 2_097
    assert logprobs.default_chunk_size(2**27) == 1  # never less than one position


@pytest.mark.parametrize("full_logits", [False, True])
def test_the_default_chunk_follows_the_vocabulary_and_changes_no_number(family, monkeypatch, full_logits):
    """Three positions' worth of logits a chunk: every chunk of the default has 3 rows (the last fewer), on the
    hidden-state path and on the full-logits path, with and without gradient, and the log-probs are those of one
    chunk for everything."""
    model, _, sequences = family
    vocabulary = model.config.vocab_size
    if full_logits:
        monkeypatch.setattr(logprobs, "FULL_LOGITS_MODEL_TYPES", {model.config.model_type})
    with torch.no_grad():
        whole = batched_logps(model, sequences, chunk_size=100_000).logps
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_ELEMENTS", 3 * vocabulary + 1)
    chunks = []
    original = logprobs._target_logps

    def recorded(source, rows, *args):
        chunks.append(rows.numel())
        return original(source, rows, *args)

    monkeypatch.setattr(logprobs, "_target_logps", recorded)
    with torch.no_grad():
        default = batched_logps(model, sequences).logps
    completion_tokens = sum(s.completion_length for s in sequences)
    assert chunks[:-1] == [3] * (len(chunks) - 1) and 1 <= chunks[-1] <= 3
    assert sum(chunks) == completion_tokens
    torch.testing.assert_close(default, whole, atol=1e-5, rtol=1e-6)
    chunks.clear()
    with_gradient = batched_logps(model, sequences).logps
    assert max(chunks) == 3  # the checkpointed chunks, recomputed in the backward pass, are just as small
    torch.testing.assert_close(with_gradient.detach(), whole, atol=1e-5, rtol=1e-6)


def test_lm_head_sees_only_completion_positions(family):
    """The memory claim: the head projects completion positions (+ the model's own last position), no more."""
    model, _, sequences = family
    projected_rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda _module, args, _output: projected_rows.append(args[0].shape[:-1].numel())
    )
    try:
        with torch.no_grad():
            batched_logps(model, sequences, chunk_size=7)
    finally:
        handle.remove()
    completion_tokens = sum(s.completion_length for s in sequences)
    # Chunks of at most 7 positions, the model's own head on one position per sequence, and the safety check.
    assert max(projected_rows) <= max(7, len(sequences))
    assert sum(projected_rows) == completion_tokens + 2 * len(sequences)


def test_gradient_matches_the_naive_loop(family):
    model, _, sequences = family
    weights = torch.linspace(0.5, 1.5, len(sequences))  # an arbitrary loss that weighs sequences differently

    def gradients(loss_fn):
        model.zero_grad()
        (loss_fn() * weights).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = gradients(lambda: naive_logps(model, sequences))
    actual = gradients(lambda: batched_logps(model, sequences, chunk_size=5).logps)
    model.zero_grad()
    assert actual.keys() == expected.keys() == {name for name, _ in model.named_parameters()}
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_peft_lora_model_with_a_lora_lm_head():
    peft = pytest.importorskip("peft")
    tokenizer = bpe_tokenizer()
    sequences = sequences_for(tokenizer)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(seed=1), config)
    assert isinstance(model.base_model.model.lm_head, peft.tuners.lora.Linear)
    with torch.no_grad():
        expected = naive_logps(model, sequences)
        with model.disable_adapter():
            base = batched_logps(model, sequences).logps
    result = batched_logps(model, sequences, chunk_size=3)
    torch.testing.assert_close(result.logps.detach(), expected, atol=1e-5, rtol=1e-6)
    assert (base - expected).abs().max() > 0.1, "the adapters must matter for this test to mean something"

    result.logps.sum().backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.lora" in name for name in trained)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bf16_model_within_tolerance(name):
    make_model, make_tokenizer = FAMILIES[name]
    sequences = sequences_for(make_tokenizer())
    with torch.no_grad():
        reference = naive_logps(make_model(), sequences)
        bf16 = make_model().to(torch.bfloat16)  # the same weights, rounded (a bf16 init draws other weights)
        same_model = naive_logps(bf16, sequences)
        result = batched_logps(bf16, sequences).logps
    assert result.dtype == torch.float32
    # Against the bf16 model's own full bf16 logits (float32 log-softmax): batching changes the bf16 rounding.
    torch.testing.assert_close(result, same_model, atol=0.02, rtol=1e-3)
    # Against the float32 model: bf16 weights and activations (measured: under 0.03 nats per token).
    counts = torch.tensor([s.completion_length for s in sequences], dtype=torch.float32)
    assert ((result - reference).abs() <= 0.05 * counts + 0.05).all()


def test_unreproduced_logit_transform_raises_and_full_logits_fallback(monkeypatch):
    """A model whose forward changes its logits beyond what the config says is caught, and can be scored."""
    model = tiny_llama()
    sequences = sequences_for(bpe_tokenizer())

    def halve_logits(_module, _args, output):
        output.logits = output.logits / 2
        return output

    handle = model.register_forward_hook(halve_logits)
    try:
        with torch.no_grad():
            with pytest.raises(RuntimeError, match="FULL_LOGITS_MODEL_TYPES"):
                batched_logps(model, sequences)
            monkeypatch.setattr(logprobs, "FULL_LOGITS_MODEL_TYPES", {"llama"})
            result = batched_logps(model, sequences, chunk_size=4).logps
            expected = naive_logps(model, sequences)
    finally:
        handle.remove()
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-6)


def test_deferred_head_checks_stay_on_the_device_and_raise_the_same_error_when_read():
    """Precompute checks the head once per shard: inside ``deferred_head_checks`` a call only records its check,
    ``raise_if_head_differs`` raises the very error the call would have; ``score_pairs`` does both."""
    from mrpo.references import score_pairs

    model = tiny_llama()
    tokenizer = bpe_tokenizer()
    sequences = sequences_for(tokenizer)
    with torch.no_grad(), logprobs.deferred_head_checks() as checks:
        batched_logps(model, sequences)
    assert len(checks) == 1 and checks[0].shape == (2,)
    logprobs.raise_if_head_differs(model, torch.stack(checks))  # a faithful head passes

    def halve_logits(_module, _args, output):
        output.logits = output.logits / 2
        return output

    model.register_forward_hook(halve_logits)
    with torch.no_grad(), logprobs.deferred_head_checks() as checks:
        batched_logps(model, sequences)
    with pytest.raises(RuntimeError, match="FULL_LOGITS_MODEL_TYPES"):
        logprobs.raise_if_head_differs(model, torch.stack(checks))
    view = ModelView(tokenizer)
    pairs = [view.tokenize(pair) for pair in standard_pairs()]
    with pytest.raises(RuntimeError, match="transforms its logits in a way mrpo does not reproduce"):
        score_pairs(model, view, pairs, 200, lambda done: None)


def test_rejects_inconsistent_masks():
    model = tiny_llama()
    batch = pad_batch([TokenizedSequence((5, 6, 7), 1), TokenizedSequence((8, 9), 1)], pad_token_id=0)
    del batch["prediction_positions"]  # hand-made masks (no host-computed positions) are checked
    at_start = dict(batch, completion_mask=torch.ones_like(batch["completion_mask"]))
    with pytest.raises(ValueError, match="position 0"):
        sequence_logps(model, **at_start)
    on_padding = dict(batch, completion_mask=batch["completion_mask"].clone())
    on_padding["completion_mask"][1, 2] = 1
    with pytest.raises(ValueError, match="padding"):
        sequence_logps(model, **on_padding)


def test_matches_trl_precomputed_reference_logps(tmp_path):
    """K = 1 parity: TRL 1.16 DPOTrainer(precompute_ref_log_probs=True) on the same model, tokenizer and pairs.

    TRL tokenizes prompt + completion + EOS text like ModelView does, so the token ids agree, except where tokens
    merge across the prompt/completion boundary: TRL then starts the completion where the two tokenizations
    diverge (the prompt's last token moves into the completion), while ModelView keeps the prompt's tokens. The
    log-probs are compared on TRL's own token ids for every pair.
    """
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    tokenizer = bpe_tokenizer()
    pairs = standard_pairs()
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        precompute_ref_log_probs=True,
        per_device_train_batch_size=2,
        max_length=None,
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast; compare float32 with float32
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=tiny_llama(),
        args=args,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(rows),
    )
    trl_rows = list(trainer.train_dataset)

    view = ModelView(tokenizer)
    for pair, row in zip(pairs, trl_rows, strict=True):
        ours = view.tokenize(pair)
        same_ids = list(ours.chosen.input_ids) == row["prompt_ids"] + row["chosen_ids"]
        assert same_ids == (not pair.prompt.endswith("\n")), pair.pair_id  # only the merging pair differs
        if same_ids:
            assert list(ours.rejected.input_ids) == row["prompt_ids"] + row["rejected_ids"]
            assert ours.chosen.prompt_length == len(row["prompt_ids"])

    def trl_sequences(column):
        return [TokenizedSequence(tuple(r["prompt_ids"] + r[column]), len(r["prompt_ids"])) for r in trl_rows]

    with torch.no_grad():
        model = tiny_llama()  # a fresh copy: TRL patches the forward of the model it was given
        pad = view.pad_token_id
        chosen = batched_logps(model, trl_sequences("chosen_ids"), pad_token_id=pad).logps
        rejected = batched_logps(model, trl_sequences("rejected_ids"), pad_token_id=pad).logps
    expected_chosen = torch.tensor([r["ref_chosen_logps"] for r in trl_rows])
    expected_rejected = torch.tensor([r["ref_rejected_logps"] for r in trl_rows])
    torch.testing.assert_close(chosen, expected_chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(rejected, expected_rejected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Padding-free packing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("bucket", [None, 64])
def test_packed_equals_padded(family, bucket):
    from mrpo.logprobs import packed_sequence_logps

    if family == "llama":
        model, view = tiny_llama(), ModelView(bpe_tokenizer(), name="bpe")
    else:
        model, view = tiny_gemma3(), ModelView(char_tokenizer(), name="char")
    pairs = [view.tokenize(pair) for pair in standard_pairs() + conversational_pairs()]
    sequences = [s for pair in pairs for s in (pair.chosen, pair.rejected)]
    padded = pad_batch(sequences, pad_token_id=view.pad_token_id, padding_side=view.padding_side)
    expected = sequence_logps(model, **padded)
    packed = pack_sequences(sequences, pad_to_multiple_of=bucket)
    result = packed_sequence_logps(model, **packed, num_sequences=len(sequences))
    torch.testing.assert_close(result.logps, expected.logps, rtol=1e-6, atol=1e-5)
    assert torch.equal(result.token_counts, expected.token_counts)
    # Gradients agree too (training uses the packed path on GPUs).
    model.train()
    packed_grads = torch.autograd.grad(
        packed_sequence_logps(model, **packed, num_sequences=len(sequences)).logps.sum(),
        list(model.parameters()),
    )
    padded_grads = torch.autograd.grad(sequence_logps(model, **padded).logps.sum(), list(model.parameters()))
    for a, b in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
