"""Tests of ``references[].tokens: policy``, the reproduction of the authors' released code: a reference that scores
the policy's token ids instead of its own tokenization of the text.

The policy here is the character-level Gemma-like model (ids below 102) and the reference the BPE Llama-like one
(about 400 embedding rows): the Llama can index every id of the policy, and reads them as its own (garbage) tokens,
as Mistral read Llama-2's ids in the authors' code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mrpo import references
from mrpo.config.schema import MRPOConfig, ReferenceConfig, load_config
from mrpo.data.tokenization import ModelView, tokenize_for_models
from mrpo.errors import ConfigError
from mrpo.prepared_split import prepare_split
from mrpo.reference_store import StoreKey
from mrpo.references import precompute
from mrpo.splits import load_views
from tiny_models import bpe_tokenizer, char_tokenizer, save_model_dir, tiny_gemma3, tiny_llama

ATOL, RTOL = 1e-5, 1e-6

RECORDS = [
    {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }
    for question, good, bad in [
        ("Capital of Spain?", "Madrid.", "Paris, I think."),
        ("What is 2 + 2?", "4", "5"),
        ("Colour of the sky?", "Blue.", "Green, mostly."),
        ("Name an animal.", "A cat.", "A rose, which is a flower and not an animal at all."),
    ]
]


@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("policy-tokens")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS), encoding="utf-8")
    characters = len(char_tokenizer())
    return {
        "root": root,
        "train": data,
        "gemma": save_model_dir(tiny_gemma3(), char_tokenizer(), root / "gemma"),
        "llama": save_model_dir(tiny_llama(), bpe_tokenizer(), root / "llama"),
        # Llamas whose embedding table is exactly as large as the character vocabulary, and one row smaller.
        "llama-just-enough": save_model_dir(tiny_llama(characters), bpe_tokenizer(), root / "llama-enough"),
        "llama-one-short": save_model_dir(tiny_llama(characters - 1), bpe_tokenizer(), root / "llama-short"),
    }


def write_config(
    run_files,
    tmp_path,
    references: str,
    *,
    policy: str = "gemma",
    max_length: int = 256,
    cached: bool = False,
) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"policy: {{model: {run_files[policy]}, dtype: float32}}\n"
        f"references:\n{references}"
        f"data: {{train: {run_files['train']}, max_length: {max_length}, cache_tokenized: {str(cached).lower()}}}\n"
        f"cache_dir: {tmp_path / 'cache'}\n",
        encoding="utf-8",
    )
    return path


def reference_line(name: str, model: Path, **fields) -> str:
    extra = "".join(f", {key}: {value}" for key, value in fields.items())
    return f"  - {{name: {name}, model: {model}, dtype: float32, batch_tokens: 128{extra}}}\n"


def plain_logps(model, tokenized_pairs) -> torch.Tensor:
    """(N, 2): each sequence alone through the model, log-softmax in float32, summed over the completion."""
    rows = []
    with torch.no_grad():
        for pair in tokenized_pairs:
            row = []
            for sequence in (pair.chosen, pair.rejected):
                ids = torch.tensor([sequence.input_ids])
                logps = model(ids).logits.float().log_softmax(-1)[0]
                positions = torch.arange(sequence.prompt_length - 1, len(sequence.input_ids) - 1)
                row.append(logps[positions, ids[0, sequence.prompt_length :]].sum())
            rows.append(torch.stack(row))
    return torch.stack(rows)


def columns(split) -> torch.Tensor:
    """(K, N, 2) cached log-probs of a prepared split."""
    cached = split.cache.columns(split.tokenization.pair_ids)
    return torch.stack([cached["reference_chosen_logps"], cached["reference_rejected_logps"]], dim=-1)


class Forwards:
    """Counts the sequences the precompute scores (padded or prefix-shared rows)."""

    def __init__(self, monkeypatch):
        self.sequences = 0
        original = references.sequence_logps

        def counted(model, input_ids, *args, **kwargs):
            self.sequences += input_ids.shape[0]
            return original(model, input_ids, *args, **kwargs)

        monkeypatch.setattr(references, "sequence_logps", counted)
        shared = references.prefix_shared_sequence_logps

        def counted_shared(model, input_ids, *args, num_sequences, **kwargs):  # one row holds a pair's two
            self.sequences += num_sequences
            return shared(model, input_ids, *args, num_sequences=num_sequences, **kwargs)

        monkeypatch.setattr(references, "prefix_shared_sequence_logps", counted_shared)


# ---------------------------------------------------------------------------------------------------------------
# 1-2. What a reference scores: the policy's ids with tokens: policy, its own tokenization by default


def test_policy_tokens_are_scored_as_the_reference_reads_the_policy_ids(run_files, tmp_path, caplog):
    config = load_config(
        write_config(
            run_files,
            tmp_path,
            reference_line("init", run_files["gemma"])
            + reference_line("llama-own", run_files["llama"])
            + reference_line("llama-policy", run_files["llama"], tokens="policy"),
            cached=True,  # the tokenized split on disk, the default route
        )
    )
    with caplog.at_level(logging.WARNING, logger="mrpo.references"):
        split = prepare_split(config, "train", show_progress=False)
    policy_pairs, _, own_pairs, policy_token_pairs = split.tokenization.per_view
    assert len(split.tokenization.pair_ids) == len(RECORDS)
    # The reference reads the policy's ids, not its own tokenization of the text.
    assert [p.chosen for p in policy_token_pairs] == [p.chosen for p in policy_pairs]
    assert [p.chosen for p in own_pairs] != [p.chosen for p in policy_pairs]

    cached = columns(split)
    llama = AutoModelForCausalLM.from_pretrained(run_files["llama"], dtype=torch.float32).eval()
    gemma = AutoModelForCausalLM.from_pretrained(run_files["gemma"], dtype=torch.float32).eval()
    torch.testing.assert_close(cached[2], plain_logps(llama, policy_pairs), atol=ATOL, rtol=RTOL)
    # The default is unchanged: each reference scores its own tokenization of the same text.
    torch.testing.assert_close(cached[1], plain_logps(llama, own_pairs), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cached[0], plain_logps(gemma, policy_pairs), atol=ATOL, rtol=RTOL)
    assert not torch.allclose(cached[1], cached[2])
    # The training dataset carries the policy-token column.
    assert torch.equal(split.dataset.reference_chosen_logps[2], cached[2, :, 0])

    said = [r.getMessage() for r in caplog.records if "policy's token ids" in r.getMessage()]
    assert said == [
        "reference 'llama-policy' scores the policy's token ids (reproduction of the authors' code): its "
        "log-probs are not of the text"
    ]

    # A second run finds the tokenized split and the stores: the same numbers, nothing scored again.
    again = prepare_split(config, "train", show_progress=False)
    assert torch.equal(columns(again), cached)
    assert [report.computed for report in again.cache.reports] == [0, 0, 0]


def test_the_reference_limit_applies_to_the_policy_tokens_and_policy_drops_stay(run_files, tmp_path):
    """A pair too long for the policy is dropped for all, as before; the reference's own max_length counts the
    policy's tokens it reads (the character tokens of these pairs, about 3-4 times their BPE tokens)."""
    views = load_views(
        load_config(
            write_config(
                run_files,
                tmp_path,
                reference_line("init", run_files["gemma"]) + reference_line("llama", run_files["llama"]),
            )
        )
    )
    pairs_as_policy = [views.policy.tokenize(pair) for pair in _pairs(run_files)]
    lengths = sorted(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs_as_policy)
    limit = lengths[-1] - 1  # only the longest pair is over it, in the policy's (character) tokens
    assert lengths[-2] <= limit
    own_lengths = [
        max(len(s.input_ids) for s in (p.chosen, p.rejected))
        for p in (views.references[1].tokenize(pair) for pair in _pairs(run_files))
    ]
    assert max(own_lengths) <= limit  # in its own tokens the reference would keep every pair

    for tokens, dropped_for in (("policy", "llama"), ("own", None)):
        config = load_config(
            write_config(
                run_files,
                tmp_path,
                reference_line("init", run_files["gemma"])
                + reference_line("llama", run_files["llama"], tokens=tokens, max_length=limit),
            )
        )
        split = prepare_split(config, "train", show_progress=False)
        expected = {f"longer than {limit} tokens for {dropped_for}": 1} if dropped_for else {}
        assert dict(split.tokenization.dropped) == expected
    # The policy's limit drops a pair for every reference, the policy-token one too.
    config = load_config(
        write_config(
            run_files,
            tmp_path,
            reference_line("init", run_files["gemma"])
            + reference_line("llama", run_files["llama"], tokens="policy"),
            max_length=limit,
        )
    )
    split = prepare_split(config, "train", show_progress=False)
    assert dict(split.tokenization.dropped) == {f"longer than {limit} tokens for policy": 1}
    assert (
        len(split.cache.columns(split.tokenization.pair_ids)["reference_chosen_logps"][1]) == len(RECORDS) - 1
    )


def _pairs(run_files):
    from mrpo.data.sources import load_pairs

    return list(load_pairs(run_files["train"]))


# ---------------------------------------------------------------------------------------------------------------
# 3. Refused unless the reference's embedding rows cover the policy's ids


@pytest.mark.parametrize(
    ("policy", "reference", "refused"),
    [
        ("llama", "gemma", True),  # ~400 BPE ids into 102 rows
        ("gemma", "llama-one-short", True),  # the policy's highest id is one past the last row
        ("gemma", "llama-just-enough", False),
    ],
)
def test_tokens_policy_is_refused_unless_the_vocabulary_covers_the_policy_ids(
    run_files, tmp_path, monkeypatch, policy, reference, refused
):
    forwards = Forwards(monkeypatch)
    config = load_config(
        write_config(
            run_files,
            tmp_path,
            reference_line("init", run_files[policy])
            + reference_line("other", run_files[reference], tokens="policy"),
            policy=policy,
        )
    )
    if not refused:
        views = load_views(config)
        assert views.references[1].tokenizer is views.policy.tokenizer
        return
    with pytest.raises(ConfigError) as caught:
        prepare_split(config, "train", show_progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "'references.1.tokens' = 'policy'" in message and "reference 'other'" in message
    assert caught.value.key == "references.1.tokens"
    assert forwards.sequences == 0  # refused before anything is scored


# ---------------------------------------------------------------------------------------------------------------
# 4. The store key: a store of policy tokens is never served for own tokens, and older stores keep their keys


def test_policy_tokens_and_own_tokens_never_share_a_store(run_files, tmp_path, monkeypatch):
    """Even where both read the same ids (the policy's tokenizer is the reference's own), the stores differ."""
    forwards = Forwards(monkeypatch)
    pairs = _pairs(run_files)
    view = ModelView(bpe_tokenizer(), name="llama")
    result = tokenize_for_models(pairs, [view], max_length=256)
    stores = {}
    for tokens in ("own", "policy", "own", "policy"):
        spec = ReferenceConfig(name="llama", model=str(run_files["llama"]), dtype="float32", tokens=tokens)
        before = forwards.sequences
        cache = precompute([spec], [view], result.per_view, tmp_path, device="cpu", show_progress=False)
        directory = cache.stores[0].directory
        computed_now = forwards.sequences - before
        # First time for each setting: every pair scored; second time: the same store, nothing scored.
        assert computed_now == (0 if tokens in stores else 2 * len(pairs))
        assert stores.setdefault(tokens, directory) == directory
        assert json.loads((directory / "key.json").read_text()).get("tokens", "own") == tokens
    assert stores["own"] != stores["policy"]


def test_the_default_key_is_the_key_stores_had_before_the_option():
    key = StoreKey("weights", "tokenizer", None, "drop", "torch.float32")
    fields_before = {name: value for name, value in asdict(key).items() if name != "tokens"}
    assert key.digest == hashlib.sha256(json.dumps(fields_before, sort_keys=True).encode()).hexdigest()[:16]
    assert (
        StoreKey("weights", "tokenizer", None, "drop", "torch.float32", tokens="policy").digest != key.digest
    )


# ---------------------------------------------------------------------------------------------------------------
# 5. The option in the config


def test_tokens_is_set_by_override_and_survives_a_round_trip(tmp_path):
    base = ["policy.model=org/policy", "data.train=pairs.jsonl"]
    two = "references=[{name: init, model: org/policy}, {name: big, model: org/big}]"
    assert load_config(None, [*base, two]).references[1].tokens == "own"
    config = load_config(None, [*base, two, "references.big.tokens=policy"])
    assert [reference.tokens for reference in config.references] == ["own", "policy"]
    assert MRPOConfig.from_dict(config.to_dict()) == config
    config.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("references.big.tokens=theirs", ["'references.1.tokens'", "'theirs'", "'own'", "'policy'"]),
        ("references.big.tokenizer=org/tok", ["'references.1.tokenizer'", "tokens: policy", "'org/tok'"]),
    ],
)
def test_bad_tokens_settings_name_the_key(override, fragments):
    overrides = [
        "policy.model=org/policy",
        "data.train=pairs.jsonl",
        "references=[{name: init, model: org/policy}, {name: big, model: org/big, tokens: policy}]",
        override,
    ]
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
