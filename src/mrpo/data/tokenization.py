"""One model's view of a preference pair: render it with that model's tokenizer and chat template, then tokenize.

Every reference scores the same prompt/completion *text* with its own tokenizer, so this module decides, per model,
which token ids stand for "the prompt" and which for "the completion" (the tokens whose log-probs are summed).

Rendering
---------
- **Standard pairs** (strings): the prompt is the prompt text, the completion is the completion text, exactly as
  given (no separator is added; put any space or newline in the data).
- **Conversational pairs** (lists of ``{"role", "content"}`` messages; chosen/rejected are the assistant turns)
  with a chat template: the prompt is ``apply_chat_template(prompt, add_generation_prompt=True)``, the full text is
  ``apply_chat_template(prompt + completion)``, and the completion is what the full text adds after the prompt. If
  the template renders the prompt differently on its own (the prompt text is not a prefix of the full text), the
  pair is dropped for this model with a reason, never silently re-split.
- **Conversational pairs for a tokenizer without a chat template** (base models such as Gemma-3-270M) get the plain
  rendering, version ``PLAIN_RENDERING_VERSION`` (it changes the numbers, so it is part of the fingerprint)::

      System: <content>\\n\\nUser: <content>\\n\\nAssistant:      <- prompt (roles title-cased)
       <assistant content>                                       <- completion: a space, then the content
      \\n\\nUser: <content>\\n\\nAssistant: <content>              <- any further completion messages

Special tokens
--------------
- BOS: the tokenizer's own habit. Whatever ``tokenizer(text)`` puts in front of the text (BOS for Gemma, nothing
  for SmolLM2) is put in front of the prompt, unless the rendered text already starts with it (a chat template that
  writes BOS itself), so BOS is never doubled. Trailing special tokens a tokenizer adds are never used.
- EOS: appended to every completion of a standard pair and of the plain rendering (unless the completion text
  already ends with the EOS text). With a chat template it is appended only when the rendered conversation does not
  already close the turn, i.e. does not end (ignoring trailing whitespace) with EOS or another special token such as
  ``<|im_end|>`` or ``<end_of_turn>``.

Prompt/completion boundary
--------------------------
The prompt is tokenized alone and the full text as a whole. If the prompt's tokens are a prefix of the full text's
tokens, the full text's tokens are used. Where the tokenizer merges across the boundary (a prompt ending in a space
or in "\\n" before a completion starting with "\\n", with a "\\n\\n" token) they are not; then the prompt and the
completion are tokenized separately and concatenated, so the completion's tokens are exactly the completion's and
the prompt's exactly the prompt's.

Overflow
--------
``tokenize_for_models`` applies ``max_length`` jointly: by default a pair that is too long for ANY model is dropped
for ALL models (sequence log-probs of truncated text differ between tokenizers, so they would not be comparable),
and the drops are counted by reason. ``overflow="truncate"`` cuts the end of the completions, identically for all
models, and is therefore allowed only when all views share one tokenizer fingerprint. With ``overflow="drop"`` a
pair whose text alone proves it over a limit (``token_bound.py``) is dropped, for the same reason, untokenized.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Protocol

from mrpo.data.processes import ordered_map, return_freed_memory
from mrpo.data.token_bound import CharacterBound, character_bound, too_long_reason, without_provably_long
from mrpo.data.token_store import (
    PairWriter,
    StoredPairs,
    TokenizedPair,
    TokenizedPairs,
    TokenizedSequence,
)
from mrpo.errors import ConfigError, ModelSourceError

__all__ = [
    "ModelView",
    "RenderError",
    "TokenizationResult",
    "tokenize_for_models",
]

PLAIN_RENDERING_VERSION = 1
"""Version of the plain-text rendering of messages for tokenizers without a chat template."""

TOKENIZATION_VERSION = 1
"""Version of the rules in this module (BOS/EOS/boundary handling); part of every fingerprint."""

Messages = list[dict[str, str]]


class PairLike(Protocol):
    """What this module needs of a preference pair (``mrpo.data.sources.PreferencePair`` is one)."""

    pair_id: str
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages


class RenderError(ValueError):
    """A pair cannot be tokenized for a model; ``reason`` is a short, countable description."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class _RenderedCompletion:
    text: str  # the completion's text, as it follows the prompt text
    append_eos: bool  # whether EOS is appended after the completion's tokens


class ModelView:
    """How one model sees preference pairs: its tokenizer, chat template and special-token habits.

    The view reads the tokenizer when it is created: build a new view after changing the tokenizer.
    """

    def __init__(self, tokenizer: Any, *, name: str = "model"):
        self.tokenizer = tokenizer
        self.name = name
        self._leading_special_ids = self._probe_leading_special_ids()
        # Special tokens that close a turn when a chat template ends the conversation with them.
        self._special_token_texts = {
            token.content for token in tokenizer.added_tokens_decoder.values() if token.special
        } | {t for t in (tokenizer.eos_token,) if t}

    # -- properties ---------------------------------------------------------------------------------------------

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, or its EOS id when it has none (padded positions are masked either way)."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"{self.name}: the tokenizer has neither a pad token nor an EOS token; set one")
        return pad

    @property
    def padding_side(self) -> str:
        return self.tokenizer.padding_side

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of everything that decides the token ids this view produces."""
        tokenizer = self.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        vocabulary = (
            backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
        )
        special = {
            attr: [getattr(tokenizer, attr, None), getattr(tokenizer, f"{attr}_id", None)]
            for attr in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        content = {
            "tokenization_version": TOKENIZATION_VERSION,
            "plain_rendering_version": PLAIN_RENDERING_VERSION,
            "class": type(tokenizer).__name__,
            "vocabulary": vocabulary,
            "special_tokens": special,
            "chat_template": tokenizer.chat_template,
            "leading_special_ids": self._leading_special_ids,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()

    # -- rendering ----------------------------------------------------------------------------------------------

    def render(self, pair: PairLike) -> tuple[str, str, str]:
        """Prompt text, chosen full text and rejected full text as this model sees them (for debugging and docs).

        The full texts are the prompt text followed by the completion text and, where EOS is appended, its text.
        """
        prompt_text, chosen, rejected = self._render(pair)
        eos = self.tokenizer.eos_token or ""

        def full(completion: _RenderedCompletion) -> str:
            return prompt_text + completion.text + (eos if completion.append_eos else "")

        return prompt_text, full(chosen), full(rejected)

    def _render(self, pair: PairLike) -> tuple[str, _RenderedCompletion, _RenderedCompletion]:
        if isinstance(pair.prompt, str):
            if not isinstance(pair.chosen, str) or not isinstance(pair.rejected, str):
                raise TypeError(f"pair {pair.pair_id}: a string prompt needs string completions")
            return pair.prompt, self._plain_completion(pair.chosen), self._plain_completion(pair.rejected)
        if self.has_chat_template:
            prompt_text = self._apply_chat_template(pair.prompt, add_generation_prompt=True)
            completions = []
            for messages in (pair.chosen, pair.rejected):
                full_text = self._apply_chat_template(
                    list(pair.prompt) + list(messages), add_generation_prompt=False
                )
                if not full_text.startswith(prompt_text):
                    raise RenderError(
                        "chat template renders the prompt differently alone",
                        f"pair {pair.pair_id}: the prompt with the generation prompt is not a prefix of the "
                        "rendered conversation",
                    )
                text = full_text[len(prompt_text) :]
                closes_turn = any(text.rstrip().endswith(token) for token in self._special_token_texts)
                completions.append(_RenderedCompletion(text, append_eos=not closes_turn))
            return prompt_text, completions[0], completions[1]
        prompt_text = _plain_messages(pair.prompt) + "\n\nAssistant:"
        chosen, rejected = (_plain_continuation(messages) for messages in (pair.chosen, pair.rejected))
        return prompt_text, self._plain_completion(chosen), self._plain_completion(rejected)

    def _plain_completion(self, text: str) -> _RenderedCompletion:
        eos = self.tokenizer.eos_token
        return _RenderedCompletion(text, append_eos=not (eos and text.endswith(eos)))

    def _apply_chat_template(self, messages: Messages, *, add_generation_prompt: bool) -> str:
        from jinja2.exceptions import SecurityError

        # tokenize=False returns the text in transformers 4 and 5 alike (tokenize=True returns a BatchEncoding in 5).
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except SecurityError as error:
            raise ModelSourceError(
                f"{self.name} ({self.tokenizer.name_or_path}): its chat template does what the template sandbox "
                f"forbids ({error}); use a tokenizer whose chat template does not, or set the model's tokenizer"
            ) from error

    # -- tokenization -------------------------------------------------------------------------------------------

    def tokenize(self, pair: PairLike) -> TokenizedPair:
        """Token ids of chosen and rejected (each prompt + completion) for this model.

        Raises ``RenderError`` when the pair cannot be tokenized for this model (see the module docstring).
        """
        (result,) = self.tokenize_many([pair])
        if isinstance(result, RenderError):
            raise result
        return result

    def tokenize_many(self, pairs: Sequence[PairLike]) -> list[TokenizedPair | RenderError]:
        """``tokenize`` for many pairs with one batched tokenizer call (a fast tokenizer encodes a batch in
        parallel, and the per-call overhead is paid once); a pair that cannot be tokenized gets its
        ``RenderError`` in its place. The ids are those ``tokenize`` gives pair by pair."""
        rendered: list[tuple[str, str, _RenderedCompletion, _RenderedCompletion, int] | RenderError] = []
        texts: list[str] = []
        for pair in pairs:
            try:
                prompt_text, chosen, rejected = self._render(pair)
            except RenderError as error:
                rendered.append(error)
                continue
            rendered.append((pair.pair_id, prompt_text, chosen, rejected, len(texts)))
            texts += [prompt_text, prompt_text + chosen.text, prompt_text + rejected.text]
        encoded = self._encode_batch(texts)
        results: list[TokenizedPair | RenderError] = []
        for item in rendered:
            if isinstance(item, RenderError):
                results.append(item)
                continue
            pair_id, prompt_text, chosen, rejected, at = item
            prompt_ids = self._with_leading_specials(encoded[at])
            try:
                if not prompt_ids:
                    raise RenderError(
                        "prompt renders to no tokens", f"pair {pair_id}: nothing to condition on"
                    )
                results.append(
                    TokenizedPair(
                        pair_id=pair_id,
                        chosen=self._tokenize_sequence(pair_id, prompt_ids, encoded[at + 1], chosen),
                        rejected=self._tokenize_sequence(pair_id, prompt_ids, encoded[at + 2], rejected),
                    )
                )
            except RenderError as error:
                results.append(error)
        return results

    def _tokenize_sequence(
        self, pair_id: str, prompt_ids: list[int], full_encoded: list[int], completion: _RenderedCompletion
    ) -> TokenizedSequence:
        full_ids = self._with_leading_specials(full_encoded)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            ids = full_ids
        else:
            # The tokenizer merged across the boundary: keep the prompt's and the completion's own tokens.
            ids = prompt_ids + self._encode(completion.text)
        if completion.append_eos:
            ids = ids + [self.tokenizer.eos_token_id]
        if len(ids) == len(prompt_ids):
            raise RenderError("empty completion", f"pair {pair_id}: the completion has no tokens")
        return TokenizedSequence(input_ids=tuple(ids), prompt_length=len(prompt_ids))

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _with_leading_specials(self, ids: list[int]) -> list[int]:
        lead = list(self._leading_special_ids)
        if lead and ids[: len(lead)] != lead:
            ids = lead + ids
        return ids

    def _probe_leading_special_ids(self) -> tuple[int, ...]:
        """The ids ``tokenizer(text)`` puts before the text's own tokens (BOS for Gemma/Llama, none for Qwen)."""
        probe = "a"
        with_specials = list(self.tokenizer(probe)["input_ids"])
        plain = self._encode(probe)
        for start in range(len(with_specials) - len(plain) + 1):
            if with_specials[start : start + len(plain)] == plain:
                return tuple(with_specials[:start])
        return ()

    def __repr__(self) -> str:
        return f"ModelView(name={self.name!r}, tokenizer={type(self.tokenizer).__name__})"


def _role_name(role: str) -> str:
    return role[:1].upper() + role[1:]


def _plain_messages(messages: Messages) -> str:
    return "\n\n".join(f"{_role_name(m['role'])}: {m['content']}" for m in messages)


def _plain_continuation(messages: Messages) -> str:
    """The completion messages as they follow the plain prompt, which ends with "Assistant:"."""
    if not messages or messages[0]["role"] != "assistant":
        raise RenderError("completion does not start with an assistant message")
    text = " " + messages[0]["content"]
    if len(messages) > 1:
        text += "\n\n" + _plain_messages(messages[1:])
    return text


# -- several models at once -------------------------------------------------------------------------------------


@dataclass
class TokenizationResult:
    """The pairs kept for every view, tokenized per view; ``per_view[k][i]`` is pair ``pair_ids[i]`` for view k.

    Each view's pairs are a ``TokenizedPairs`` (in memory) or ``StoredPairs`` (on disk): int32 arrays, 4 bytes a
    token. Views that share a tokenizer object share one storage (``owners[k]`` is the view whose storage view k
    reads).
    """

    view_names: list[str]
    per_view: list[TokenizedPairs | StoredPairs]
    dropped: Counter[str] = field(default_factory=Counter)
    owners: list[int] = field(default_factory=list)

    @property
    def pair_ids(self) -> Sequence[str]:
        """The kept pairs' ids, in order (every view keeps the same pairs)."""
        return self.per_view[0].pair_ids

    def summary(self) -> str:
        total = len(self.pair_ids) + sum(self.dropped.values())
        line = f"kept {len(self.pair_ids)} of {total} pairs for {', '.join(self.view_names)}"
        if self.dropped:
            ordered = sorted(self.dropped.items(), key=lambda item: (-item[1], item[0]))  # ties by name
            line += "; dropped: " + "; ".join(f"{n} {reason}" for reason, n in ordered)
        return line


def tokenize_for_models(
    pairs: Iterable[PairLike],
    views: Sequence[ModelView],
    *,
    max_length: int | Sequence[int | None] | None,
    overflow: Literal["drop", "truncate"] = "drop",
    storage: Callable[[int], TokenizedPairs | PairWriter] | None = None,
    num_proc: int | None = None,
) -> TokenizationResult:
    """Tokenize every pair for every view, keeping only the pairs that every view can score.

    ``max_length`` is one limit for all views or one per view (None: no limit), in tokens of prompt + completion.
    With ``overflow="drop"`` a pair whose chosen or rejected sequence is longer than a view's limit is dropped for
    all views. ``overflow="truncate"`` needs all views to share one tokenizer fingerprint; it cuts the completions'
    ends to the smallest limit (the prompt is kept whole; a pair whose prompt alone reaches the limit is dropped).
    A pair a view cannot render is dropped for all views too. Drops are counted by reason in ``dropped``.

    ``storage(k)`` makes the storage of view k's pairs: ``TokenizedPairs`` in memory by default, or a
    ``PairWriter`` that streams them to disk (``pairs`` is then read as it comes and never held whole).

    ``num_proc`` > 1 tokenizes blocks of ``TOKENIZE_BLOCK`` pairs in that many worker processes
    (``processes.ordered_map``: spawned, at most two blocks each in flight), each with the same views; this
    process reads the pairs and stores each block's pairs in the pairs' order, so the tokens, pair ids, drops
    and order are those of one process. None or 1: all in this process.
    """
    if not views:
        raise ValueError("tokenize_for_models needs at least one view")
    plan = _plan(views, max_length, overflow)
    make = storage or (lambda k: TokenizedPairs())
    sinks = {k: make(k) for k in plan.stored}
    dropped: Counter[str] = Counter()
    blocks = ordered_map(_tokenize_block, plan, _blocks(pairs, TOKENIZE_BLOCK), num_proc=num_proc)
    try:
        with contextlib.closing(blocks):
            for parts, block_dropped in blocks:
                dropped.update(block_dropped)
                for k, sink in sinks.items():
                    sink.extend(parts[k])
                if storage is not None:
                    return_freed_memory()
    except BaseException:
        for sink in sinks.values():
            if isinstance(sink, PairWriter):
                sink.close()
        raise
    finished = {k: sink.finish() for k, sink in sinks.items()}
    return TokenizationResult(
        view_names=[v.name for v in views],
        per_view=[finished[plan.owners[k]] for k in range(len(views))],
        dropped=dropped,
        owners=plan.owners,
    )


@dataclass(frozen=True)
class _Plan:
    """What tokenizing a block needs (pickled once into each worker process)."""

    views: Sequence[ModelView]
    owners: list[int]
    """``owners[k]``: the view whose storage view k reads (the first view with its tokenizer object)."""
    limits: list[int | None]
    bounds: list[CharacterBound | None]
    overflow: str
    stored: list[int]
    """The views whose storages hold the pairs (one per tokenizer object)."""


def _plan(views: Sequence[ModelView], max_length: int | Sequence[int | None] | None, overflow: str) -> _Plan:
    limits = _overflow_limits(views, max_length, overflow)
    # Views that share one tokenizer object produce the same ids (the policy and its initialising reference, as
    # ``splits.load_views`` loads a tokenizer named twice once): each pair is tokenized once for them, and they
    # share one storage. Their kept pairs are the same, since a limit only drops a pair for all views (or truncates
    # at the common limit). Identity, not the fingerprint, which would serialise every vocabulary once more.
    first_view: dict[int, int] = {}
    owners = [first_view.setdefault(id(view.tokenizer), k) for k, view in enumerate(views)]
    bounds = [
        character_bound(view.tokenizer) if overflow == "drop" and limit is not None else None
        for view, limit in zip(views, limits, strict=True)
    ]
    return _Plan(list(views), owners, limits, bounds, overflow, sorted(set(owners)))


def _tokenize_block(plan: _Plan, block: list[PairLike]) -> tuple[dict[int, TokenizedPairs], Counter[str]]:
    """One block's kept pairs per stored view, in the block's order, and its drops by reason."""
    views, owners, limits = plan.views, plan.owners, plan.limits
    dropped: Counter[str] = Counter()
    if any(plan.bounds):
        block = without_provably_long(block, views, limits, plan.bounds, dropped)
    encoded = {k: views[k].tokenize_many(block) for k in plan.stored}
    parts = {k: TokenizedPairs() for k in plan.stored}
    for i in range(len(block)):
        kept = _within_limits(
            [encoded[owners[k]][i] for k in range(len(views))], views, limits, plan.overflow
        )
        if isinstance(kept, str):
            dropped[kept] += 1
            continue
        for k, part in parts.items():
            part.append(kept[k])
    return parts, dropped


def _overflow_limits(
    views: Sequence[ModelView], max_length: int | Sequence[int | None] | None, overflow: str
) -> list[int | None]:
    """Each view's token limit under ``overflow``: its own with "drop"; with "truncate" the smallest, which needs
    one shared tokenizer (the same text cut at a token limit ends at different places for different ones)."""
    limits = _per_view_limits(max_length, len(views))
    if overflow == "drop":
        return limits
    if overflow != "truncate":
        raise ValueError(f"overflow must be 'drop' or 'truncate', got {overflow!r}")
    if len({view.fingerprint for view in views}) > 1:
        names = ", ".join(f"{view.name} ({view.tokenizer.name_or_path})" for view in views)
        raise ConfigError(
            f"data.overflow=truncate needs all models to share one tokenizer, and {names} do not: truncating "
            "the same text at a token limit cuts it at different places for different tokenizers, so their "
            "sequence log-probs would not be comparable. Use data.overflow=drop (the default), or raise "
            "max_length.",
            key="data.overflow",
        )
    common = [limit for limit in limits if limit is not None]
    return [min(common) if common else None] * len(views)


TOKENIZE_BLOCK = 256
"""Pairs per batched tokenizer call (per view): enough to amortise the call, few enough to hold in memory."""


def _blocks(pairs: Iterable[PairLike], size: int) -> Iterator[list[PairLike]]:
    iterator = iter(pairs)
    while block := list(itertools.islice(iterator, size)):
        yield block


def _within_limits(
    tokenized: list[TokenizedPair | RenderError],
    views: Sequence[ModelView],
    limits: list[int | None],
    overflow: str,
) -> list[TokenizedPair] | str:
    """One pair as every view keeps it, or the reason it is dropped (from the first view, in order, that cannot)."""
    kept = []
    for one, view, limit in zip(tokenized, views, limits, strict=True):
        if isinstance(one, RenderError):
            return f"{one.reason} for {view.name}"
        if limit is not None:
            one = _apply_limit(one, limit, overflow)
            if one is None:
                if overflow == "truncate":
                    return f"prompt reaches {limit} tokens for {view.name}"
                return too_long_reason(limit, view.name)
        kept.append(one)
    return kept


def _per_view_limits(max_length: int | Sequence[int | None] | None, n_views: int) -> list[int | None]:
    if max_length is None or isinstance(max_length, int):
        limits = [max_length] * n_views
    else:
        limits = list(max_length)
        if len(limits) != n_views:
            raise ValueError(f"max_length has {len(limits)} entries for {n_views} views")
    for limit in limits:
        if limit is not None and limit < 2:
            raise ValueError(
                f"max_length must be at least 2 tokens (a prompt and a completion token), got {limit}"
            )
    return limits


def _apply_limit(pair: TokenizedPair, limit: int, overflow: str) -> TokenizedPair | None:
    sequences = (pair.chosen, pair.rejected)
    if all(len(s.input_ids) <= limit for s in sequences):
        return pair
    if overflow == "drop" or any(s.prompt_length >= limit for s in sequences):
        return None
    chosen, rejected = (TokenizedSequence(s.input_ids[:limit], s.prompt_length) for s in sequences)
    return TokenizedPair(pair.pair_id, chosen, rejected)
