"""A pair provably longer than a token limit, found from its text's length without tokenizing it.

Tokenizing a 1 MB row costs hundreds of MB (a fast tokenizer keeps offsets and strings per token) only to drop it
for being over ``max_length``. No characters-per-token constant is safe for every tokenizer: an unknown word is one
token in WordPiece (and a run of unknown characters one fused token in many BPE and Unigram models), whitespace
pre-tokenizers and ``Strip``/NFKC normalizers delete or merge characters, and byte-level BPE vocabularies that lack
a byte delete it (SmolLM2 turns a thousand "\\x06" characters into no tokens at all). So the bound is proved per
tokenizer, from what it is made of, and only where the proof holds:

* the model is BPE without subword prefixes or suffixes, that reads every character: byte-level (a ByteLevel
  pre-tokenizer and every UTF-8 continuation byte in the vocabulary, so every character of two or more bytes keeps
  at least one; single-byte characters whose byte is missing are deleted, so not counted) or with byte fallback
  (every byte that UTF-8 uses as a ``<0xXX>`` token);
* the normalizer can only lengthen the text (none, ``Prepend``, ``Replace`` of a string by one at least as long);
* the pre-tokenizer deletes nothing (ByteLevel, Metaspace, Digits, and Split/Punctuation unless "removed");
* no added token strips the whitespace around it.

Then every token of the rendered text covers at most ``M`` characters, ``M`` the longest entry of the vocabulary
(added tokens included; a byte-level entry's length counts bytes, never fewer than the characters it touches), so a
text of ``n`` counted characters has at least ``n / M`` tokens, and one of more than ``limit * M`` characters is
over ``limit``: dropped for the same reason the token check gives. For SmolLM2 ``M`` is 81, for Gemma 3 31.
Any other tokenizer (and ``overflow="truncate"``) is tokenized whole, as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

_SAFE_NORMALIZERS = frozenset({"Prepend", "Replace", "Sequence"})
_SAFE_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "Sequence"})
# Bytes that UTF-8 text can hold (0xC0, 0xC1 and 0xF5-0xFF never occur).
_UTF8_BYTES = [byte for byte in range(256) if byte not in (0xC0, 0xC1) and byte < 0xF5]


class CharacterBound:
    """At most ``chars_per_token`` characters per token, not counting the characters in ``uncounted`` (which the
    tokenizer deletes)."""

    def __init__(self, chars_per_token: int, uncounted: frozenset[str]):
        self.chars_per_token = chars_per_token
        self.uncounted = uncounted

    def provably_over(self, text: str, limit: int) -> bool:
        threshold = limit * self.chars_per_token
        if len(text) <= threshold:
            return False
        return len(text) - sum(text.count(character) for character in self.uncounted) > threshold


def character_bound(tokenizer: Any) -> CharacterBound | None:
    """The tokenizer's proved bound on characters per token, or None where none is proved (see the module doc)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if type(model).__name__ != "BPE" or model.continuing_subword_prefix or model.end_of_word_suffix:
        return None
    normalizer, pre_tokenizer = _state(backend.normalizer), _state(backend.pre_tokenizer)
    if not (_lengthens_only(normalizer) and _deletes_nothing(pre_tokenizer)):
        return None
    if any(token.lstrip or token.rstrip for token in tokenizer.added_tokens_decoder.values()):
        return None
    vocabulary = tokenizer.get_vocab()
    if _has_type(pre_tokenizer, "ByteLevel"):
        uncounted = _deleted_characters(vocabulary)
        if uncounted is None or (uncounted and normalizer is not None):
            return None  # a missing multi-byte piece, or a normalizer that might write a deleted character
    elif model.byte_fallback and all(f"<0x{byte:02X}>" in vocabulary for byte in _UTF8_BYTES):
        uncounted = frozenset()
    else:
        return None
    return CharacterBound(max(map(len, vocabulary)), uncounted)


def without_provably_long(
    block: list,
    views: Sequence[Any],
    limits: Sequence[int | None],
    bounds: Sequence[CharacterBound | None],
    dropped,
) -> list:
    """The block less the pairs whose text proves them over a view's limit, counted in ``dropped`` as the token
    check counts them (under the first such view): a 1 MB row is never tokenized only to be dropped."""
    kept = []
    for pair in block:
        length = raw_length(pair)
        over = next(
            (
                k
                for k, view in enumerate(views)
                if provably_too_long(view, bounds[k], pair, limits[k], length)
            ),
            None,
        )
        if over is None:
            kept.append(pair)
        else:
            dropped[too_long_reason(limits[over], views[over].name)] += 1
    return kept


def too_long_reason(limit: int | None, view_name: str) -> str:
    """The drop reason of a pair over ``limit`` tokens for a view, whichever check found it."""
    return f"longer than {limit} tokens for {view_name}"


def provably_too_long(
    view: Any, bound: CharacterBound | None, pair: Any, limit: int | None, raw_length: int
) -> bool:
    """Whether the chosen or rejected text as ``view`` renders it (what is tokenized) is over ``limit`` tokens by
    ``bound``. Only a pair whose raw text (``raw_length`` characters) is over the threshold is rendered: rendering
    every pair would cost more than the check saves, and one that a template pushes over is tokenized, as before."""
    if bound is None or limit is None or raw_length <= limit * bound.chars_per_token:
        return False
    try:
        _, chosen, rejected = view.render(pair)
    except Exception:  # a pair the view cannot render is tokenized, and dropped there with its reason
        return False
    return bound.provably_over(chosen, limit) or bound.provably_over(rejected, limit)


def raw_length(pair: Any) -> int:
    """Characters of the prompt plus the longer completion, as given (before any rendering)."""
    return _text_length(pair.prompt) + max(_text_length(pair.chosen), _text_length(pair.rejected))


def _text_length(text: str | Sequence[dict]) -> int:
    if isinstance(text, str):
        return len(text)
    return sum(len(message.get("content") or "") for message in text)


def _state(component: Any) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def _has_type(state: dict | None, name: str) -> bool:
    if state is None:
        return False
    parts = state.get("pretokenizers") or state.get("normalizers") or []
    return state["type"] == name or any(_has_type(part, name) for part in parts)


def _lengthens_only(state: dict | None) -> bool:
    if state is None:
        return True
    if state["type"] not in _SAFE_NORMALIZERS:
        return False
    if state["type"] == "Sequence":
        return all(_lengthens_only(part) for part in state["normalizers"])
    if state["type"] == "Replace":
        pattern = state["pattern"].get("String")
        return pattern is not None and len(state["content"]) >= len(pattern)
    return True  # Prepend


def _deletes_nothing(state: dict | None) -> bool:
    if state is None:
        return True
    if state["type"] not in _SAFE_PRE_TOKENIZERS:
        return False
    if state["type"] == "Sequence":
        return all(_deletes_nothing(part) for part in state["pretokenizers"])
    return state.get("behavior") not in ("Removed", "removed")


def _deleted_characters(vocabulary: dict[str, int]) -> frozenset[str] | None:
    """The single-byte characters a byte-level vocabulary lacks (so deletes); None when it lacks a continuation
    byte (a character of several bytes might then lose them all). A missing lead byte deletes only that byte."""
    from tokenizers import pre_tokenizers

    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    deleted = set()
    for byte in _UTF8_BYTES:
        (piece, _), *_ = to_bytes.pre_tokenize_str(_character_holding(byte))
        if piece[-1 if 0x80 <= byte < 0xC0 else 0] not in vocabulary:
            if 0x80 <= byte < 0xC0:
                return None
            if byte < 0x80:
                deleted.add(chr(byte))
    return frozenset(deleted)


def _character_holding(byte: int) -> str:
    """A character whose UTF-8 encoding has ``byte`` first (last, for a continuation byte)."""
    if byte < 0x80:
        return chr(byte)
    if byte < 0xC0:
        return chr(byte)  # U+0080..U+00BF: 0xC2 then this byte
    if byte < 0xE0:
        return chr((byte & 0x1F) << 6)
    if byte < 0xF0:
        return chr(((byte & 0x0F) << 12) | (0x800 if byte == 0xE0 else 0))
    return chr(((byte & 0x07) << 18) | (0x10000 if byte == 0xF0 else 0))
