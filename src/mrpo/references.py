"""The K-reference cache: each reference scores every pair once, on its own tokenization, into a reusable store.

Here: scoring pairs (``score_pairs``: ``batching``'s token-budget batches through ``logprobs.sequence_logps``, or
prefix-shared rows through ``logprobs.prefix_shared_sequence_logps`` with ``references[].prefix_shared``),
filling each reference's store with the pairs it lacks (``precompute``) and serving the stores as ``(K, N)``
columns (``open_cache``, ``ReferenceCache``). The store on disk (its key, shards and lock) is ``reference_store``'s.

A *store* holds one reference's sequence log-probs. It lives in ``cache_dir/store-<key>/`` where ``key``
(``store_key``) hashes everything that changes the numbers except the text: the model's identity and weights, the
tokenizer and chat template (the view's fingerprint), whose token ids it scores (its own, or the policy's:
``references[].tokens``), the overflow policy and ``max_length`` when it truncates (with the default
``overflow="drop"`` a pair is scored whole or not at all, so the limit changes no stored number), the dtype and
``LOGPROB_CODE_VERSION``; not the rows' layout (padded or prefix-shared) nor ``batch_tokens``, which change the
numbers by float rounding only (~1e-6 nats). The text itself is in the entries' keys: a pair id is a hash of the
pair's content, so an entry ``pair_id -> log-probs`` can never be served for other text. Beside each entry is a
64-bit tag of the exact token ids it scored (``data.token_store.pair_token_tags``: the chosen and rejected prompt +
completion ids for this reference's view); a lookup asks for the tags of the tokens at hand, so an entry scored
from other tokens (a tokenized entry damaged, then rebuilt) reads as missing and is scored again: damage upstream
never reaches a store.
A store is therefore shared by every data set, subsample and run that uses the same reference: adding pairs
computes only the missing ones.

Entries are written in shards, each renamed into place whole and named by its checksum (``reference_store``), so
a killed run resumes from the finished shards and a damaged one is recomputed, never used.

Only one model is in memory at a time. Under ``accelerate launch`` the missing pairs are split across processes,
each writing its own shards; everyone reads all shards after a barrier.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mrpo.batching import pad_batch, prefix_shared_batch, prefix_shared_length, token_budget_batches
from mrpo.config.schema import ReferenceConfig
from mrpo.data.token_store import TokenizedPair, pair_ids_of, pair_token_tags, sequence_at, sequence_lengths
from mrpo.data.tokenization import ModelView
from mrpo.errors import CacheError
from mrpo.fast_path import reference_rows_shared, use_shared_rows
from mrpo.logprobs import (
    deferred_head_checks,
    prefix_shared_refusal,
    prefix_shared_sequence_logps,
    raise_if_head_differs,
    sequence_logps,
)
from mrpo.models import default_device, load_model, torch_dtype
from mrpo.pair_table import pair_numbers
from mrpo.reference_store import ReferenceStore, StoreKey, store_directory, store_lock
from mrpo.weights import check_token_ids, model_fingerprint

logger = logging.getLogger(__name__)

SHARD_PAIRS = 512
"""Pairs per shard: small enough that a killed run loses little, large enough that a store has few files."""

# ----------------------------------------------------------------------------------------------------------------
# Scoring: token-budget batches (``batching.token_budget_batches``) through the one log-prob function
# ----------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def score_pairs(
    model,
    view: ModelView,
    pairs: Sequence[TokenizedPair],
    batch_tokens: int,
    progress: Callable[[int], None],
    *,
    prefix_shared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (N, 2) float32 and token counts (N, 2) of chosen/rejected for ``pairs`` under ``model``.

    One host-device sync for all of ``pairs`` (precompute passes a shard): every batch's results stay on the
    device, with its LM-head check (``logprobs.deferred_head_checks``), and come back in one copy at the end. On
    CUDA the batches go up from pinned memory without waiting, so the host pads the next batch while the device
    scores this one. ``prefix_shared``: one row per pair, its prompt computed once
    (``batching.prefix_shared_batch``); the same numbers up to float rounding.
    """
    if prefix_shared:
        return _score_prefix_shared(model, view, pairs, batch_tokens, progress)
    # Sequences are read batch by batch: compact ``TokenizedPairs`` are never expanded into tuples all at once.
    lengths = sequence_lengths(pairs)
    device = next(model.parameters()).device
    order: list[int] = []
    results: list[torch.Tensor] = []
    done_sequences = 0
    with deferred_head_checks() as head_checks:
        for batch in token_budget_batches(lengths, batch_tokens):
            tensors = pad_batch(
                [sequence_at(pairs, j) for j in batch],
                pad_token_id=view.pad_token_id,
                padding_side=view.padding_side,
            )
            check_token_ids(model, view.name, tensors["input_ids"])
            tensors = _pinned(tensors, device)
            inputs = [tensors[name].to(device, non_blocking=True) for name in _MODEL_INPUTS]
            result = sequence_logps(model, *inputs, prediction_positions=tensors["prediction_positions"])
            order.extend(batch)
            results.append(torch.stack([result.logps.float(), result.token_counts.float()]))
            # Progress is reported in pairs (two sequences each); integer division keeps the total exact.
            before, done_sequences = done_sequences, done_sequences + len(batch)
            progress(done_sequences // 2 - before // 2)
    logps, counts = _to_host(model, order, results, head_checks, len(lengths))
    return logps.view(-1, 2), counts.view(-1, 2)


PREFIX_SHARED_WINDOW = 1024
"""Pairs read into memory at a time by the prefix-shared precompute, to measure their rows and batch them."""


def _score_prefix_shared(
    model, view: ModelView, pairs: Sequence[TokenizedPair], batch_tokens: int, progress: Callable[[int], None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``score_pairs`` on prefix-shared rows: windows of pairs read once, batched longest row first; as the padded
    path, the results and head checks stay on the device until one copy at the end."""
    device = next(model.parameters()).device
    order: list[int] = []
    results: list[torch.Tensor] = []
    with deferred_head_checks() as head_checks:
        for start in range(0, len(pairs), PREFIX_SHARED_WINDOW):
            window = [(pair.chosen, pair.rejected) for pair in pairs[start : start + PREFIX_SHARED_WINDOW]]
            rows = [prefix_shared_length(chosen, rejected) for chosen, rejected in window]
            for batch in token_budget_batches(rows, batch_tokens):
                tensors = prefix_shared_batch([window[i] for i in batch], pad_token_id=view.pad_token_id)
                check_token_ids(model, view.name, tensors["input_ids"])
                tensors = _pinned(tensors, device)
                result = prefix_shared_sequence_logps(
                    model,
                    *(tensors[name].to(device, non_blocking=True) for name in _SHARED_INPUTS),
                    tensors["prediction_positions"],
                    tensors["prediction_targets"],
                    tensors["prediction_owners"],
                    num_sequences=2 * len(batch),
                )
                # Sequence j of the pairs is pair j // 2's chosen (j even) or rejected (j odd) answer.
                order += [2 * (start + i) for i in batch] + [2 * (start + i) + 1 for i in batch]
                results.append(torch.stack([result.logps.float(), result.token_counts.float()]))
                progress(len(batch))
    logps, counts = _to_host(model, order, results, head_checks, 2 * len(pairs))
    return logps.view(-1, 2), counts.view(-1, 2)


_SHARED_INPUTS = ("input_ids", "position_ids", "segment_ids")


_MODEL_INPUTS = ("input_ids", "attention_mask", "completion_mask")


def _pinned(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch in page-locked memory when it goes to a CUDA device (a copy from it need not wait)."""
    if device.type != "cuda":
        return tensors
    return {name: tensor.pin_memory() for name, tensor in tensors.items()}


def _to_host(
    model, order: list[int], results: list[torch.Tensor], head_checks: list[torch.Tensor], sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every batch's (2, n) log-probs and token counts, put back in sequence order, and the LM-head checks: one
    float32 copy to the host (a token count is exact in float32 below 2**24), then the checks raise if they fail."""
    logps = torch.empty(sequences, dtype=torch.float32)
    counts = torch.empty(sequences, dtype=torch.int64)
    if not results:
        return logps, counts
    pieces = [torch.cat(results, dim=1).flatten(), *(check.float() for check in head_checks)]
    host = torch.cat(pieces).cpu()  # the one host-device sync
    values = host[: 2 * len(order)].view(2, len(order))
    if head_checks:
        raise_if_head_differs(model, host[2 * len(order) :])
    index = torch.tensor(order)
    logps[index] = values[0]
    counts[index] = values[1].long()
    return logps, counts


# ----------------------------------------------------------------------------------------------------------------
# The cache across K references
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ReferenceReport:
    """What the precompute did for one reference."""

    name: str
    store: str
    pairs: int
    computed: int
    """Distinct pairs scored by this run."""
    reused: int
    """Pairs (rows) whose log-probs were already in the store."""
    discarded_shards: int
    seconds: float
    label_agreement: float
    """Share of the pairs whose chosen response this reference finds more likely than the rejected one."""
    mean_chosen_logp: float
    mean_rejected_logp: float


@dataclass
class ReferenceCache:
    """Cached log-probs of K references, served as ``(K, N)`` columns aligned to pair ids."""

    names: list[str]
    stores: list[ReferenceStore]
    reports: list[ReferenceReport] = field(default_factory=list)
    token_tags: list[tuple[np.ndarray, np.ndarray]] | None = None
    """Per reference, the pair numbers and the tags of the tokens the cache was opened for: ``columns`` of those
    pairs serves only entries scored from those tokens."""

    def _tags_for(self, k: int, numbers: np.ndarray) -> np.ndarray | None:
        if self.token_tags is None:
            return None
        known, tags = self.token_tags[k]
        return tags if np.array_equal(known, numbers) else None

    def columns(self, pair_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """``reference_chosen_logps`` / ``reference_rejected_logps`` (K, N) float32 and token counts (K, N).

        Raises CacheError naming the reference and the first missing pair when the cache was built for other data
        (or, for the pairs it was opened for, scored from other tokens).
        """
        chosen = torch.empty(len(self.stores), len(pair_ids), dtype=torch.float32)
        rejected = torch.empty_like(chosen)
        chosen_tokens = torch.empty(len(self.stores), len(pair_ids), dtype=torch.int64)
        rejected_tokens = torch.empty_like(chosen_tokens)
        numbers = pair_numbers(pair_ids)
        for k, (name, store) in enumerate(zip(self.names, self.stores, strict=True)):
            positions = store.entries.positions(numbers, self._tags_for(k, numbers))
            absent = np.flatnonzero(positions < 0)
            if len(absent):
                raise CacheError(
                    f"reference {k + 1} ({name!r}, store {store.directory}) has no log-probs for {len(absent)} of "
                    f"{len(pair_ids)} pairs from these tokens (first: pair id {pair_ids[absent[0]]}): the cache "
                    "was built for other data. Run `mrpo precompute` with this config (or let `mrpo train` do it)."
                )
            table = torch.from_numpy(store.entries.rows(positions))
            not_finite = (~torch.isfinite(table[:, :2])).any(dim=1).nonzero().flatten().tolist()
            if not_finite:
                first = pair_ids[not_finite[0]]
                raise CacheError(
                    f"reference {k + 1} ({name!r}) gives a non-finite log-prob for {len(not_finite)} pair(s) (first: "
                    f"pair id {first}, chosen {table[not_finite[0], 0].item()}, rejected "
                    f"{table[not_finite[0], 1].item()}): the model assigns (near) zero probability to a completion "
                    "token, often a float16 overflow. Score it in float32 or bfloat16, or drop those pairs."
                )
            chosen[k], rejected[k] = table[:, 0], table[:, 1]
            chosen_tokens[k], rejected_tokens[k] = table[:, 2].long(), table[:, 3].long()
        return {
            "reference_chosen_logps": chosen,
            "reference_rejected_logps": rejected,
            "reference_chosen_tokens": chosen_tokens,
            "reference_rejected_tokens": rejected_tokens,
        }

    def summary(self) -> str:
        lines = [
            "reference        pairs  computed  reused  agree-with-labels  mean logp chosen/rejected  time"
        ]
        for r in self.reports:
            lines.append(
                f"{r.name:<15} {r.pairs:>6} {r.computed:>9} {r.reused:>7} {r.label_agreement:>18.1%}"
                f"  {r.mean_chosen_logp:>11.2f} / {r.mean_rejected_logp:<11.2f} {r.seconds:>6.1f}s"
            )
        return "\n".join(lines)


def store_key(spec: ReferenceConfig, view: ModelView, overflow: str, device: torch.device) -> StoreKey:
    return StoreKey(
        model_fingerprint=model_fingerprint(spec.model, spec.hash_weights),
        tokenizer_fingerprint=view.fingerprint,
        # With overflow="drop" a pair is either scored whole or not at all, so max_length does not change any
        # stored number and stores are shared across max_length values; truncation does change them.
        max_length=spec.max_length if overflow == "truncate" else None,
        overflow=overflow,
        dtype=str(torch_dtype(spec.dtype, device)),
        tokens=spec.tokens,
    )


def precompute(
    specs: Sequence[ReferenceConfig],
    views: Sequence[ModelView],
    tokenized: Sequence[Sequence[TokenizedPair]],
    cache_dir: str | os.PathLike,
    *,
    overflow: str = "drop",
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> ReferenceCache:
    """Make sure every reference's store holds every pair; compute only what is missing.

    Args:
        specs: the K references, the initialising one first.
        views: each reference's ``ModelView`` (same order).
        tokenized: for each reference, the pairs as that reference tokenizes them (same pairs, same order for
            every reference: the output of ``tokenize_for_models``).
        cache_dir: root of the stores.
        overflow: the overflow policy the pairs were tokenized with (part of the store key).
    """
    from accelerate import PartialState

    state = PartialState()
    device = torch.device(device) if device is not None else state.device
    root = Path(cache_dir)
    stores, reports, token_tags = [], [], []
    for spec, view, pairs in zip(specs, views, tokenized, strict=True):
        start = time.perf_counter()
        if spec.tokens == "policy" and state.is_main_process:
            logger.warning(
                "reference %r scores the policy's token ids (reproduction of the authors' code): its log-probs are "
                "not of the text",
                spec.name,
            )
        key = store_key(spec, view, overflow, device)
        # Another run scoring into this store: wait for it and reuse what it wrote (one lock per run, taken by
        # its main process, so the processes of one run still split the work).
        with store_lock(store_directory(root, key), enabled=state.is_main_process):
            state.wait_for_everyone()
            store = ReferenceStore.open(root, key)
            # Every process must see the same store before any of them writes to it: a process that opened it
            # after another had written shards would find fewer pairs missing, split them differently, and pairs
            # would be scored twice or by nobody.
            state.wait_for_everyone()
            stores.append(store)
            reports.append(
                _fill_store(spec, view, pairs, store, device, state, show_progress, token_tags, start)
            )
    cache = ReferenceCache([spec.name for spec in specs], stores, reports, token_tags)
    if state.is_main_process:
        logger.info("Reference cache under %s:\n%s", root, cache.summary())
    return cache


def _fill_store(
    spec: ReferenceConfig,
    view: ModelView,
    pairs: Sequence[TokenizedPair],
    store: ReferenceStore,
    device: torch.device,
    state,
    show_progress: bool,
    token_tags: list[tuple[np.ndarray, np.ndarray]],
    start: float,
) -> ReferenceReport:
    """Score the pairs ``store`` lacks (for these tokens) into it; what was done."""
    pair_ids = pair_ids_of(pairs)
    numbers, tags = pair_numbers(pair_ids), pair_token_tags(pairs)
    token_tags.append((numbers, tags))
    absent = np.flatnonzero(store.entries.positions(numbers, tags) < 0)
    _warn_other_tokens(spec, store, numbers[absent])
    # Indices, not pairs: the first index of each distinct missing pair id (a duplicated row is scored once).
    _, first = np.unique(numbers[absent], return_index=True)
    todo = np.sort(absent[first])
    if len(todo):
        _compute_missing(spec, view, pairs, todo, store, device, state, show_progress)
        # Every process computed the same todo from the same store: all of them read the others' shards.
        state.wait_for_everyone()
        store.reload()
    seconds = time.perf_counter() - start
    return _report(
        spec, store, numbers, computed=len(todo), reused=len(pair_ids) - len(absent), seconds=seconds
    )


def _warn_other_tokens(spec: ReferenceConfig, store: ReferenceStore, absent: np.ndarray) -> None:
    """One line when pairs the store holds were scored from other tokens than the ones at hand."""
    stale = int((store.entries.positions(absent) >= 0).sum())
    if stale:
        logger.warning(
            "Reference %r: %d pair(s) in %s were scored from other tokens than these (a tokenized entry damaged or "
            "rebuilt since): scoring them again.",
            spec.name,
            stale,
            store.directory,
        )


def open_cache(
    specs: Sequence[ReferenceConfig],
    views: Sequence[ModelView],
    pair_ids: Sequence[str],
    cache_dir: str | os.PathLike,
    *,
    overflow: str = "drop",
    device: torch.device | str | None = None,
    config_path: str | None = None,
    tokenized: Sequence[Sequence[TokenizedPair]] | None = None,
) -> ReferenceCache:
    """The K stores as they are, computing nothing: for readers such as ``mrpo inspect``.

    ``tokenized`` (each reference's tokens of these pairs): serve only entries scored from exactly those tokens.
    Raises CacheError naming the first reference whose store is absent or lacks some of ``pair_ids``, and the
    command that fills it.
    """
    device = torch.device(device) if device is not None else default_device()
    root = Path(cache_dir)
    fill = f"`mrpo precompute {config_path}`" if config_path else "`mrpo precompute` with this config"
    stores = []
    numbers = pair_numbers(pair_ids)
    token_tags = None if tokenized is None else [(numbers, pair_token_tags(pairs)) for pairs in tokenized]
    for k, (spec, view) in enumerate(zip(specs, views, strict=True)):
        key = store_key(spec, view, overflow, device)
        directory = store_directory(root, key)
        if not (directory / "key.json").is_file():
            raise CacheError(
                f"reference {k + 1} ({spec.name!r}, {spec.model}) has no store under {root} for this model, "
                f"tokenizer and settings: run {fill} first"
            )
        store = ReferenceStore(directory, key)
        store.reload()
        missing = store.missing(pair_ids, None if token_tags is None else token_tags[k][1])
        if missing:
            raise CacheError(
                f"reference {k + 1} ({spec.name!r}, {spec.model}) lacks {len(missing)} of {len(pair_ids)} pairs "
                f"from these tokens in {directory} (first: pair id {missing[0]}): run {fill} first"
            )
        stores.append(store)
    return ReferenceCache([spec.name for spec in specs], stores, token_tags=token_tags)


def _compute_missing(
    spec: ReferenceConfig,
    view: ModelView,
    pairs: Sequence[TokenizedPair],
    todo: np.ndarray,
    store: ReferenceStore,
    device: torch.device,
    state,
    show_progress: bool,
) -> None:
    """Score ``pairs[i]`` for i in ``todo`` into shards of the store; each process takes every n-th shard."""
    from tqdm.auto import tqdm

    shards = [todo[i : i + SHARD_PAIRS] for i in range(0, len(todo), SHARD_PAIRS)]  # views, not copies
    mine = shards[state.process_index :: state.num_processes]
    if not mine:
        return
    model = load_model(spec.model, torch_dtype(spec.dtype, device), device, role=f"reference {spec.name!r}")
    total = sum(len(shard) for shard in mine)
    chosen = reference_rows_shared(spec.prefix_shared, cuda=device.type == "cuda")
    refusal = prefix_shared_refusal(model) if chosen else None
    shared_rows = use_shared_rows(
        spec.prefix_shared, chosen, refusal, key=f"references.{spec.name}.prefix_shared"
    )
    bar = tqdm(
        total=total,
        unit="pair",
        desc=f"precompute {spec.name}",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    try:
        for indices in mine:
            shard = [pairs[i] for i in indices]  # one shard's pairs in memory at a time
            values, tokens = score_pairs(
                model, view, shard, spec.batch_tokens, bar.update, prefix_shared=shared_rows
            )
            # The tags of the very tokens scored (a stored read was checked against its checksum).
            store.write_shard([pair.pair_id for pair in shard], values, tokens, pair_token_tags(shard))
    finally:
        bar.close()
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _report(
    spec: ReferenceConfig,
    store: ReferenceStore,
    pair_ids: np.ndarray,
    computed: int,
    reused: int,
    seconds: float,
) -> ReferenceReport:
    positions = store.entries.positions(pair_ids)
    values = store.entries.rows(positions[positions >= 0])
    n = len(values)
    agree = int((values[:, 0] > values[:, 1]).sum())
    return ReferenceReport(
        name=spec.name,
        store=str(store.directory),
        pairs=len(pair_ids),
        computed=computed,
        reused=reused,
        discarded_shards=store.discarded_shards,
        seconds=seconds,
        label_agreement=agree / n if n else math.nan,
        mean_chosen_logp=float(values[:, 0].mean(dtype=np.float64)) if n else math.nan,
        mean_rejected_logp=float(values[:, 1].mean(dtype=np.float64)) if n else math.nan,
    )
