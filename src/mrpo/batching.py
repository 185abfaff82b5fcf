"""Batching: the rules that cut pairs into rows and micro-batches, on the host, before any model runs.

Padded rows (``pad_batch``), packed rows without padding (``pack_sequences``), prefix-shared rows that hold a pair's
prompt once (``prefix_shared_batch``, ``prefix_shared_attention``), the rounding of a row's length
(``padded_length``), the positions that predict completion tokens (``prediction_positions``), and the token
budget: the grouping of items under it (``longest_first_groups``), padded batches of sequences or rows
(``token_budget_batches``), what a policy forward over pairs costs (``forward_tokens``), the training pairs'
micro-batches (``token_budget_groups``) and the length buckets their rows are padded to (``bucket_length``).
The log-probs of the rows are ``mrpo.logprobs``'s; this module knows nothing of models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mrpo.data.token_store import TokenizedSequence


def padded_length(length: int, pad_to_multiple_of: int | None) -> int:
    """``length`` rounded up to a multiple of ``pad_to_multiple_of`` (unchanged when it is None): the one rounding
    rule of ``pad_batch``, ``pack_sequences`` and the collator's token budget."""
    return -(-length // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else length


def bucket_length(length: int, pad_to_multiple_of: int | None = None) -> int:
    """The row length of a micro-batch under a token budget (``policy.micro_batch_tokens``), rounded so that
    lengths repeat: a multiple of ``pad_to_multiple_of`` when it is set (1: the exact length), else the next of
    four lengths per doubling: a length in (2^k, 2^(k+1)] is rounded up to a multiple of 2^(k-2), so the buckets
    are ..., 56, 64, 80, 96, 112, 128, 160, 192, ... (exact up to 8 tokens; multiples of 8 above 32).

    Why this default: each new shape is paid once (an attention plan, a kernel choice; with ``policy.compile`` a
    graph), each padding token at every forward. Four per doubling pads at most 25% (about 7% more tokens in
    all) and makes a length distribution's shapes a few dozen at most. Measured by the grouping rule alone on
    the GPU bench's pairs (UltraFeedback-like lengths, 8 pairs a step, budget 4 x the longest, 60 steps):
    exact lengths gave 165 distinct padded micro-batch shapes (148 packed); four per doubling 18 (13) for 7%
    more tokens; multiples of 64 23 (44: they cut long rows finely and short ones coarsely); powers of two 3
    (4) for 31% (19%) more tokens.
    """
    if pad_to_multiple_of:
        return padded_length(length, pad_to_multiple_of)
    shift = (length - 1).bit_length() - 3
    return padded_length(length, 1 << shift) if shift > 0 else length


def longest_first_groups(
    sizes: Sequence[int], budget: int, cost: Callable[[list[int]], int]
) -> list[list[int]]:
    """The one grouping rule of batches under a token budget (precompute batches, training micro-batches).

    Items are taken longest first (``sizes``; ties in input order) and a group is closed when adding the next item
    would make ``cost(group)`` exceed ``budget``, so items are padded only to items of similar length. An item
    that alone exceeds the budget is a group of its own. Returns indices into ``sizes``, every index exactly once.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for index in order:
        candidate = [*current, index]
        if current and cost(candidate) > budget:
            groups.append(current)
            candidate = [index]
        current = candidate
    if current:
        groups.append(current)
    return groups


def pad_batch(
    sequences: Sequence[TokenizedSequence],
    *,
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """Pad tokenized sequences into a batch.

    Returns ``input_ids``, ``attention_mask`` and ``completion_mask``, each (N, T) int64, where T is the longest
    sequence (rounded up to ``pad_to_multiple_of``), and ``prediction_positions`` (see
    ``logprobs.sequence_logps``). ``completion_mask[i, t] = 1`` where token t of sequence i is a completion token.
    Example, right padding with pad id 0, sequences ``(5, 6, 7)`` with ``prompt_length=2`` and ``(8, 9)`` with
    ``prompt_length=1``::

        input_ids            [[5, 6, 7], [8, 9, 0]]
        attention_mask       [[1, 1, 1], [1, 1, 0]]
        completion_mask      [[0, 0, 1], [0, 1, 0]]
        prediction_positions [[0, 1], [1, 0]]        # (row, column) of the states that predict (5,6,7)[2], (8,9)[1]
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    length = padded_length(max(len(s.input_ids) for s in sequences), pad_to_multiple_of)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        n = len(sequence.input_ids)
        start = 0 if padding_side == "right" else length - n
        input_ids[i, start : start + n] = torch.tensor(sequence.input_ids, dtype=torch.long)
        attention_mask[i, start : start + n] = 1
        completion_mask[i, start + sequence.prompt_length : start + n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "prediction_positions": prediction_positions(completion_mask),
    }


def prediction_positions(completion_mask: Tensor) -> Tensor:
    """(2, M) int64 rows and columns of the hidden states that predict a completion token (its left neighbour).

    Computed on the host by the collators, so that the training step needs no data-dependent ``nonzero`` (a
    host-device sync) on the accelerator.
    """
    rows, cols = completion_mask[:, 1:].nonzero(as_tuple=True)
    return torch.stack([rows, cols])


def pack_sequences(
    sequences: Sequence[TokenizedSequence], *, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """Pack tokenized sequences into one row without padding, for ``logprobs.packed_sequence_logps``.

    Returns ``input_ids``, ``position_ids``, ``completion_mask`` and ``sequence_index``, each (1, T) int64, and
    ``prediction_positions`` (2, M) (see ``logprobs.sequence_logps``), where T is the total length (rounded up to
    ``pad_to_multiple_of`` with a filler document whose ``sequence_index`` is -1 and whose tokens count for
    nothing, so that compiled models see few distinct shapes). Example: sequences
    ``(5, 6, 7)`` with ``prompt_length=2`` and ``(8, 9)`` with ``prompt_length=1``::

        input_ids       [[5, 6, 7, 8, 9]]
        position_ids    [[0, 1, 2, 0, 1]]
        completion_mask [[0, 0, 1, 0, 1]]
        sequence_index  [[0, 0, 0, 1, 1]]
    """
    if not sequences:
        raise ValueError("pack_sequences needs at least one sequence")
    length = padded_length(sum(len(s.input_ids) for s in sequences), pad_to_multiple_of)
    input_ids = torch.zeros(length, dtype=torch.long)
    position_ids = torch.arange(length, dtype=torch.long)
    completion_mask = torch.zeros(length, dtype=torch.long)
    sequence_index = torch.full((length,), -1, dtype=torch.long)
    start = 0
    for index, sequence in enumerate(sequences):
        n = len(sequence.input_ids)
        if sequence.prompt_length < 1:
            raise ValueError(f"sequence {index} has no prompt token: packing needs one before the completion")
        input_ids[start : start + n] = torch.tensor(sequence.input_ids, dtype=torch.long)
        position_ids[start : start + n] = torch.arange(n)
        completion_mask[start + sequence.prompt_length : start + n] = 1
        sequence_index[start : start + n] = index
        start += n
    position_ids[start:] = torch.arange(length - start)  # the filler is a document of its own
    return {
        "input_ids": input_ids[None],
        "position_ids": position_ids[None],
        "completion_mask": completion_mask[None],
        "sequence_index": sequence_index[None],
        "prediction_positions": prediction_positions(completion_mask[None]),
    }


def token_budget_batches(
    lengths: Sequence[int], batch_tokens: int, *, pad_to_multiple_of: int | None = None
) -> list[list[int]]:
    """Group row indices, longest first, so that (batch size x longest length, rounded up to
    ``pad_to_multiple_of``) stays within the budget: the precompute's padded sequences, prefix-shared rows.

    A row longer than the budget gets a batch of its own.
    """
    return longest_first_groups(
        lengths,
        batch_tokens,
        lambda group: len(group) * padded_length(max(lengths[i] for i in group), pad_to_multiple_of),
    )


def forward_tokens(
    lengths: Sequence[tuple[int, int]],
    *,
    padded: bool,
    pad_to_multiple_of: int | None = None,
    bucketed: bool = False,
) -> int:
    """Tokens one policy forward over these pairs' chosen and rejected sequences processes, padding included
    (``bucketed``: the row length rounded by ``bucket_length``, as under a token budget)."""
    rounded = bucket_length if bucketed else padded_length
    if padded:
        return 2 * len(lengths) * rounded(max(max(pair) for pair in lengths), pad_to_multiple_of)
    return rounded(sum(sum(pair) for pair in lengths), pad_to_multiple_of)


def token_budget_groups(
    lengths: Sequence[tuple[int, int]],
    budget: int,
    *,
    padded: bool,
    pad_to_multiple_of: int | None = None,
    bucketed: bool = False,
) -> list[list[int]]:
    """Split pairs into micro-batches whose forward costs at most ``budget`` tokens (``forward_tokens``; with
    ``bucketed``, each row's length rounded by ``bucket_length``, as the collator pads them).

    ``lengths`` holds each pair's (chosen, rejected) sequence lengths. Pairs are taken longest first and a group is
    closed when the next pair would take it over the budget, so the padded path pads short pairs only to other
    short pairs. The two sequences of a pair always share a micro-batch (the loss needs both); a pair that alone
    exceeds the budget is a micro-batch of its own. Returns indices into ``lengths``, every index exactly once.

    Example, padded, budget 40: lengths [(3, 4), (9, 10), (4, 2), (8, 8)] -> [[1, 3], [0, 2]]
    (pairs 1 and 3 cost 2 x 2 x 10 = 40; adding pair 0 would cost 60, so it opens the next group).
    """
    if budget < 1:
        raise ValueError(f"micro-batch token budget must be >= 1, got {budget}")

    def cost(group: list[int]) -> int:
        return forward_tokens(
            [lengths[i] for i in group],
            padded=padded,
            pad_to_multiple_of=pad_to_multiple_of,
            bucketed=bucketed,
        )

    return longest_first_groups([max(pair) for pair in lengths], budget, cost)


# ----------------------------------------------------------------------------------------------------------------
# Prefix-shared rows: one row per pair, [shared prefix | chosen tail | rejected tail], the prompt computed once
# ----------------------------------------------------------------------------------------------------------------

PREFIX, CHOSEN, REJECTED, FILLER = 0, 1, 2, 3
"""``segment_ids`` of a prefix-shared row: the shared prefix, the chosen tail, the rejected tail, row padding."""


def shared_prefix_length(chosen: TokenizedSequence, rejected: TokenizedSequence) -> int:
    """The longest common prefix of the two sequences' ids, capped at the shorter prompt: it holds no completion
    token (usually it is the whole prompt; shorter where the two prompts tokenize differently at their ends)."""
    limit = min(chosen.prompt_length, rejected.prompt_length)
    length = 0
    while length < limit and chosen.input_ids[length] == rejected.input_ids[length]:
        length += 1
    return length


def prefix_shared_length(chosen: TokenizedSequence, rejected: TokenizedSequence) -> int:
    """Tokens of the pair's prefix-shared row: chosen + rejected, less the shared prefix counted once."""
    return len(chosen.input_ids) + len(rejected.input_ids) - shared_prefix_length(chosen, rejected)


def prefix_shared_batch(
    pairs: Sequence[tuple[TokenizedSequence, TokenizedSequence]],
    *,
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """One row per (chosen, rejected) pair: [shared prefix | chosen tail | rejected tail], right-padded.

    For ``logprobs.prefix_shared_sequence_logps``. With s the shared prefix (``shared_prefix_length``), c and r the
    tails' lengths, a row holds the chosen sequence whole (columns 0..s+c-1) and then the rejected tail; the
    rejected tail's positions continue from the prefix (s..s+r-1), and ``prefix_shared_attention`` lets it see the
    prefix and itself, never the chosen tail. Returns, all computed here on the host:

    - ``input_ids``, ``position_ids``, ``segment_ids`` (B, T) int64 (``PREFIX``, ``CHOSEN``, ``REJECTED``,
      ``FILLER``), T the longest row rounded up to ``pad_to_multiple_of``;
    - ``prediction_positions`` (2, M) rows and columns of the hidden states that predict completion tokens,
      ``prediction_targets`` (M,) the token each predicts, ``prediction_owners`` (M,) its sequence: pair b's
      chosen is b, its rejected B + b (the order of ``pad_batch``'s rows: chosen first).

    Completion token j of a sequence is predicted by that sequence's token j - 1 (in the prefix when j - 1 < s).
    Example: chosen (5, 6, 7) and rejected (5, 6, 8, 9), prompt length 2 each::

        input_ids            [[5, 6, 7, 8, 9]]
        position_ids         [[0, 1, 2, 2, 3]]
        segment_ids          [[0, 0, 1, 2, 2]]
        prediction_positions [[0, 0, 0], [1, 1, 3]]
        prediction_targets   [7, 8, 9]
        prediction_owners    [0, 1, 1]
    """
    if not pairs:
        raise ValueError("prefix_shared_batch needs at least one pair")
    shared = [shared_prefix_length(chosen, rejected) for chosen, rejected in pairs]
    longest = max(len(c.input_ids) + len(r.input_ids) - s for (c, r), s in zip(pairs, shared, strict=True))
    length = padded_length(longest, pad_to_multiple_of)
    input_ids = torch.full((len(pairs), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(pairs), length), dtype=torch.long)
    segment_ids = torch.full((len(pairs), length), FILLER, dtype=torch.long)
    rows, cols, targets, owners = [], [], [], []
    for b, ((chosen, rejected), s) in enumerate(zip(pairs, shared, strict=True)):
        for side, sequence in (("chosen", chosen), ("rejected", rejected)):
            if sequence.prompt_length < 1:
                raise ValueError(f"the {side} sequence of pair {b} has no prompt token before its completion")
        n, tail = len(chosen.input_ids), rejected.input_ids[s:]
        input_ids[b, :n] = torch.tensor(chosen.input_ids, dtype=torch.long)
        input_ids[b, n : n + len(tail)] = torch.tensor(tail, dtype=torch.long)
        position_ids[b, :n] = torch.arange(n)
        position_ids[b, n : n + len(tail)] = torch.arange(s, len(rejected.input_ids))
        segment_ids[b, :s], segment_ids[b, s:n], segment_ids[b, n : n + len(tail)] = PREFIX, CHOSEN, REJECTED
        # Chosen token j sits at column j, so column j - 1 predicts it.
        chosen_sources = torch.arange(chosen.prompt_length - 1, n - 1)
        # Rejected token i sits at column i in the prefix, at n + (i - s) in the tail.
        rejected_sources = torch.arange(rejected.prompt_length - 1, len(rejected.input_ids) - 1)
        rejected_sources = torch.where(rejected_sources < s, rejected_sources, rejected_sources + n - s)
        for owner, sources, sequence in (
            (b, chosen_sources, chosen),
            (len(pairs) + b, rejected_sources, rejected),
        ):
            rows.append(torch.full_like(sources, b))
            cols.append(sources)
            targets.append(torch.tensor(sequence.input_ids[sequence.prompt_length :], dtype=torch.long))
            owners.append(torch.full_like(sources, owner))
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "prediction_positions": torch.stack([torch.cat(rows), torch.cat(cols)]),
        "prediction_targets": torch.cat(targets),
        "prediction_owners": torch.cat(owners),
    }


def prefix_shared_attention(segment_ids: Tensor) -> Tensor:
    """(B, 1, T, T) bool, True where query q may attend key k in a prefix-shared row (``prefix_shared_batch``).

    Causal, and a key outside the prefix only for a query of its own segment: the prefix sees the prefix, a chosen
    token the prefix and earlier chosen tokens, a rejected token the prefix and earlier rejected tokens, never the
    chosen tail. Row padding (``FILLER``) sees the prefix and itself, so no query row is fully masked (no NaN) and
    no real token sees padding. Elementwise, so it runs where ``segment_ids`` is (the device: no (T, T) transfer).
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    queries, keys = segment_ids[:, :, None], segment_ids[:, None, :]
    return (causal & ((keys == PREFIX) | (keys == queries)))[:, None]
