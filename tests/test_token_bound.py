"""A pair whose text proves it over max_length is dropped before tokenization, for the reason the token check gives;
the proof (characters per token) exists only for tokenizers that cannot delete or fuse characters."""

from __future__ import annotations

import copy
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import mrpo.data.tokenization
from mrpo.data.sources import pairs_from_records
from mrpo.data.token_bound import character_bound
from mrpo.data.tokenization import ModelView, tokenize_for_models
from tiny_models import bpe_tokenizer, char_tokenizer

HUGE = 60_000


def records() -> list[dict]:
    rows = [{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}.", "rejected": f" {i}."} for i in range(4)]
    rows.insert(
        2, {"prompt": "Tell me everything.", "chosen": " " + "All of it. " * (HUGE // 11), "rejected": " No."}
    )
    return rows


@pytest.fixture
def encoded_lengths(monkeypatch):
    """The length of every text the tokenizers are asked to encode."""
    lengths: list[int] = []
    call = PreTrainedTokenizerFast.__call__

    def spy(self, text, *args, **kwargs):
        lengths.extend(len(one) for one in ([text] if isinstance(text, str) else text))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", spy)
    return lengths


def test_a_huge_pair_is_dropped_and_counted_without_being_tokenized(encoded_lengths, monkeypatch):
    views = [ModelView(bpe_tokenizer(), name="policy"), ModelView(char_tokenizer(), name="gemma")]
    pairs = pairs_from_records(records())
    encoded_lengths.clear()  # the views' probes
    result = tokenize_for_models(pairs, views, max_length=64)
    assert result.dropped == {"longer than 64 tokens for policy": 1}
    assert list(result.pair_ids) == [pair.pair_id for i, pair in enumerate(pairs) if i != 2]
    assert encoded_lengths and max(encoded_lengths) < 100  # the huge text was never encoded

    # Without the bound the same pair is tokenized whole and dropped for the same reason, the rest alike.
    monkeypatch.setattr(mrpo.data.tokenization, "character_bound", lambda tokenizer: None)
    encoded_lengths.clear()
    tokenized = tokenize_for_models(pairs, views, max_length=64)
    assert max(encoded_lengths) > HUGE
    assert tokenized.dropped == result.dropped
    assert [tokenized.per_view[0][i] for i in range(4)] == [result.per_view[0][i] for i in range(4)]


def test_a_view_without_a_proved_bound_and_truncation_tokenize_everything(encoded_lengths):
    pairs = pairs_from_records(records())
    result = tokenize_for_models(pairs, [ModelView(char_tokenizer(), name="gemma")], max_length=64)
    assert result.dropped == {"longer than 64 tokens for gemma": 1} and max(encoded_lengths) > HUGE
    encoded_lengths.clear()
    truncated = tokenize_for_models(pairs, [ModelView(bpe_tokenizer())], max_length=64, overflow="truncate")
    assert len(truncated.pair_ids) == 5 and max(encoded_lengths) > HUGE  # its completion is cut, not dropped


def byte_level_tokenizer(missing: str = "") -> PreTrainedTokenizerFast:
    """A byte-level BPE whose vocabulary is the byte alphabet, less the byte-level characters of ``missing``."""
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    left_out = {c for piece, _ in to_bytes.pre_tokenize_str(missing) for c in piece} if missing else set()
    alphabet = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in left_out]
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = to_bytes
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_only_tokenizers_that_cannot_delete_or_fuse_characters_get_a_bound():
    bound = character_bound(bpe_tokenizer())
    assert bound is not None and bound.chars_per_token == len("<|endoftext|>") and not bound.uncounted
    assert (
        character_bound(char_tokenizer()) is None
    )  # WordLevel: an unknown piece is one token, whatever its size
    nfkc = copy.deepcopy(bpe_tokenizer())
    nfkc.backend_tokenizer.normalizer = normalizers.NFKC()  # merges characters
    assert character_bound(nfkc) is None
    whitespace = copy.deepcopy(bpe_tokenizer())
    whitespace.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # deletes whitespace
    assert character_bound(whitespace) is None
    assert character_bound(byte_level_tokenizer("\u00e9")) is None  # a continuation byte missing
    deleting = byte_level_tokenizer("\x06")
    assert character_bound(deleting).uncounted == {"\x06"}


def test_the_bound_holds_on_texts_made_to_break_it():
    rng = random.Random(0)
    for tokenizer in (bpe_tokenizer(), byte_level_tokenizer("\x06")):
        bound = character_bound(tokenizer)
        vocabulary = sorted(tokenizer.get_vocab(), key=len)
        texts = [
            " " * 3000,
            "\n" * 3000,
            "".join(
                rng.choice(vocabulary[-20:]) for _ in range(300)
            ),  # the longest entries, added tokens too
            "\x06" * 3000 + "ab",  # deleted where the byte is missing
            "".join(chr(rng.choice([rng.randrange(0x80), rng.randrange(0x80, 0xD800)])) for _ in range(3000)),
        ]
        for text in texts:
            tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            counted = len(text) - sum(text.count(character) for character in bound.uncounted)
            assert tokens * bound.chars_per_token >= counted
            assert not bound.provably_over(text, tokens)  # never claims a text that fits its limit is over
