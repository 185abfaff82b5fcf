"""One split of the data read and tokenized for the policy and every reference: the views (how each model reads
text), the split's source, its pairs read into memory or streamed, and its tokens from the tokenized cache
(``data/token_cache.py``) or made in memory. Everything before a reference scores anything.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrpo.config.schema import MRPOConfig, ReferenceConfig
from mrpo.data.pairs import PairCounts, PairSet, PairStream, PreferencePair, warn_identical
from mrpo.data.rows import ROW_RULES_VERSION
from mrpo.data.sources import load_pairs, pairs_from_records, source_identity, stream_pairs
from mrpo.data.token_cache import CachedSplit, open_or_tokenize
from mrpo.data.tokenization import ModelView, TokenizationResult, tokenize_for_models
from mrpo.errors import ConfigError, DataError
from mrpo.models import load_model_config, load_tokenizer, model_position_limit

logger = logging.getLogger(__name__)

POLICY_VIEW = "policy"


@dataclass
class Views:
    """How the policy and each reference read text."""

    policy: ModelView
    references: list[ModelView]


def resolved_references(config: MRPOConfig) -> list[ReferenceConfig]:
    """The references with their effective max_length filled in."""
    return [
        dataclasses.replace(reference, max_length=config.reference_max_length(reference))
        for reference in config.references
    ]


def load_views(config: MRPOConfig) -> Views:
    """The policy's and every reference's view; a tokenizer named twice (the policy and its initialising
    reference, usually) is loaded once. A reference with ``tokens: policy`` gets a view of the policy's tokenizer
    (so it shares the policy's tokens), once its vocabulary is checked to cover the policy's ids."""
    loaded: dict[tuple[str, str | None], Any] = {}

    def tokenizer_for(role: str, model: str, tokenizer: str | None):
        if (model, tokenizer) not in loaded:
            loaded[model, tokenizer] = load_tokenizer(model, tokenizer, role=role)
        return loaded[model, tokenizer]

    policy_tokenizer = tokenizer_for("policy", config.policy.model, config.policy.tokenizer)
    policy = ModelView(policy_tokenizer, name=POLICY_VIEW)
    references = []
    for index, reference in enumerate(config.references):
        role = f"references.{index} ({reference.name})"
        if reference.tokens == "policy":
            check_vocabulary_covers_policy(index, reference, policy_tokenizer)
            tokenizer = policy_tokenizer
        else:
            tokenizer = tokenizer_for(role, reference.model, reference.tokenizer)
        references.append(ModelView(tokenizer, name=reference.name))
    return Views(policy, references)


def check_vocabulary_covers_policy(index: int, reference: ReferenceConfig, policy_tokenizer: Any) -> None:
    """Refuse ``tokens: policy`` unless every id the policy's tokenizer can produce is a row of the reference's
    embedding table (an id past it is an index error deep in torch, or on CUDA a device assert). Whether the ids
    mean the same in both vocabularies is not checked: scoring them regardless is what the switch reproduces."""
    key = f"references.{index}.tokens"
    model_config = load_model_config(reference.model, role=f"references.{index} ({reference.name})")
    model_config = getattr(model_config, "text_config", None) or model_config
    rows = getattr(model_config, "vocab_size", None)
    policy_max_id = max(len(policy_tokenizer) - 1, max(policy_tokenizer.get_vocab().values(), default=-1))
    if not isinstance(rows, int):
        raise ConfigError(
            f"'{key}' = 'policy': reference {reference.name!r} ({reference.model}) does not say its vocab_size, so "
            "whether it can read the policy's token ids cannot be checked; use tokens: own",
            key=key,
        )
    if rows <= policy_max_id:
        raise ConfigError(
            f"'{key}' = 'policy': reference {reference.name!r} ({reference.model}) has {rows} embedding rows but "
            f"the policy's tokenizer produces ids up to {policy_max_id}; it cannot score the policy's token ids "
            "(use tokens: own)",
            key=key,
        )


def split_source(config: MRPOConfig, split: str) -> tuple[str, str, int | None]:
    """The split's source, the name of the split to read in it, and its subsample size."""
    data = config.data
    if split == "train":
        return data.train, data.train_split, data.max_pairs
    if data.eval is None:
        raise DataError("data.eval is not set: there is no held-out split to read (set data.eval=PATH)")
    return data.eval, data.eval_split, data.max_eval_pairs


def read_split(config: MRPOConfig, split: str) -> PairSet:
    """One split's pairs, in memory."""
    source, name, _ = split_source(config, split)
    return load_pairs(source, split=name, **_read_options(config, split))


def read_records(config: MRPOConfig, split: str, records: Iterable[dict]) -> PairSet:
    """One split's pairs from rows in memory (``mrpo.build_trainer``'s datasets), by the rules ``read_split`` reads
    a file with; the split's source (``data.train`` / ``data.eval``) is the label its errors name."""
    source, _, _ = split_source(config, split)
    return pairs_from_records(records, source=source, **_read_options(config, split))


def _read_options(config: MRPOConfig, split: str) -> dict:
    """The data section's row rules and subsample for one split, as ``load_pairs`` and ``pairs_from_records``
    take them."""
    _, _, max_pairs = split_source(config, split)
    data = config.data
    return {
        "max_pairs": max_pairs,
        "seed": data.seed,
        "on_error": data.on_error,
        "fmt": data.format,
        "drop_identical": data.drop_identical,
        "cap_name": "max_pairs" if split == "train" else "max_eval_pairs",
    }


def stream_split(config: MRPOConfig, split: str) -> PairStream:
    """One split's pairs read as they come (no subsampling), for data larger than memory."""
    source, name, _ = split_source(config, split)
    data = config.data
    return stream_pairs(
        source, split=name, on_error=data.on_error, fmt=data.format, drop_identical=data.drop_identical
    )


def find_pairs(
    config: MRPOConfig, split: str, tokenized: TokenizedSplit, pair_ids: set[str]
) -> dict[str, PreferencePair]:
    """The pairs of one split with these ids: from memory, or read again from the source (until all are found;
    iterating a stream repeats none of the first read's warnings)."""
    pairs = tokenized.pairs if tokenized.pairs is not None else stream_split(config, split)
    found: dict[str, PreferencePair] = {}
    for pair in pairs:
        if pair.pair_id in pair_ids:
            found[pair.pair_id] = pair
            if len(found) == len(pair_ids):
                break
    return found


@dataclass
class TokenizedSplit:
    """One split read and tokenized for the policy and every reference, before any reference is scored."""

    counts: PairCounts
    """The account of the read (rows, kept, dropped by reason)."""
    tokenization: TokenizationResult
    references: list[ReferenceConfig]
    """The references with the max_length their stores are keyed by."""
    pairs: PairSet | None = None
    """The pairs in memory, when the split was read into memory; None when its tokens came from the disk cache
    (``find_pairs`` reads any pair's text again)."""


def tokenize_split(
    config: MRPOConfig, split: str, views: Views, pairs: PairSet | None = None
) -> TokenizedSplit:
    """Read one split and tokenize it jointly (a pair too long for any model is dropped for all): from the
    tokenized cache when it can be (``data.cache_tokenized``), else in memory. ``pairs``: the split already read
    into memory (``read_records``), tokenized in memory."""
    references = resolved_references(config)
    all_views = [views.policy, *views.references]
    limits = effective_limits(config, references)
    if config.data.overflow == "truncate":
        # Truncation cuts every model at the smallest limit (one shared tokenizer), so that limit is what the
        # reference stores must be keyed by.
        references = [dataclasses.replace(reference, max_length=min(limits)) for reference in references]
    cached = _tokenize_to_cache(config, split, all_views, limits) if pairs is None else None
    if cached is not None:
        pairs, counts, tokenization = None, cached.counts, cached.tokenization
        if cached.found and counts.identical:  # a read from the data warned when it built the entry
            warn_identical(
                counts.source,
                counts.identical,
                counts.first_identical,
                config.data.drop_identical,
                stacklevel=2,
            )
        how = "found" if cached.found else "stored"
        logger.info("%s split: %s Tokenized pairs %s in %s.", split, counts.summary(), how, cached.directory)
    else:
        pairs = pairs if pairs is not None else read_split(config, split)
        counts = pairs.counts()
        tokenization = tokenize_for_models(
            pairs,
            all_views,
            max_length=limits,
            overflow=config.data.overflow,
            num_proc=_num_proc_per_process(config.data.num_proc),
        )
    if not tokenization.pair_ids:
        raise DataError(
            f"no {split} pair is left after tokenization ({tokenization.summary()}); raise data.max_length or "
            "check the data",
            source=counts.source,
        )
    if tokenization.dropped:
        logger.warning("%s split: %s", split, tokenization.summary())
    return TokenizedSplit(counts, tokenization, references, pairs)


def _tokenize_to_cache(
    config: MRPOConfig, split: str, views: list[ModelView], limits: list[int]
) -> CachedSplit | None:
    """The split's tokens from (or into) ``cache_dir``; None where the cache does not apply: turned off, a
    subsample (``max_pairs``), or a source whose content cannot be identified cheaply (a hub dataset)."""
    source, name, max_pairs = split_source(config, split)
    if not config.data.cache_tokenized or max_pairs is not None:
        return None
    identity = source_identity(source, name)
    if identity is None:
        return None
    owners = [next(j for j, other in enumerate(views) if other.tokenizer is view.tokenizer) for view in views]
    content = {
        "source": identity,
        "format": config.data.format,
        "on_error": config.data.on_error,
        "drop_identical": config.data.drop_identical,
        "row_rules_version": ROW_RULES_VERSION,
        "view_names": [view.name for view in views],  # the drop reasons stored with the entry name them
        "tokenizers": {k: views[k].fingerprint for k in sorted(set(owners))},
        "owners": owners,
        "limits": limits,
        "overflow": config.data.overflow,
    }
    from accelerate import PartialState

    # Under accelerate launch the first process of each machine tokenizes and stores; the others then find the
    # entry (on a cache shared between machines, two first processes may both build: the second rename is dropped).
    with PartialState().local_main_process_first():
        return open_or_tokenize(
            Path(config.cache_dir),
            content,
            views,
            lambda: stream_split(config, split),
            max_length=limits,
            overflow=config.data.overflow,
            num_proc=config.data.num_proc,  # the others wait: the builder may use the machine
        )


def _num_proc_per_process(num_proc: int | None) -> int | None:
    """``data.num_proc`` for a tokenization that every process of the machine does at once (in memory, under
    accelerate launch): shared among them, so that the machine runs about ``num_proc`` workers, not that many per
    process."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, num_proc // processes) if num_proc and processes > 1 else num_proc


def effective_limits(config: MRPOConfig, references: list[ReferenceConfig]) -> list[int]:
    """Per model (the policy, then each reference): its max_length, capped at the positions the model was built for.

    A learned position table indexes out of range past its size; a rotary model would score past the context it
    was trained on. Pairs beyond a model's limit are dropped for all models and counted under that model's name.
    """
    models = [("policy", config.policy.model, config.data.max_length, "data.max_length")]
    models += [
        (f"references.{index} ({reference.name})", reference.model, reference.max_length,
         f"references.{index}.max_length")
        for index, reference in enumerate(references)
    ]  # fmt: skip
    limits = []
    for role, model, limit, key in models:
        positions = model_position_limit(model)
        if positions is not None and positions < limit:
            logger.warning(
                "%s (%s) has %d positions, fewer than %s = %d: pairs longer than %d tokens for it are dropped.",
                role, model, positions, key, limit, positions,
            )  # fmt: skip
            limit = positions
        limits.append(limit)
    return limits


_RENDERINGS_SHOWN: set[str] = set()


def show_plain_renderings(config: MRPOConfig, split: str, views: Views, tokenized: TokenizedSplit) -> None:
    """Once per tokenizer and process: how a reference without a chat template reads a pair (plain text, roles
    spelled out), so nobody has to read a docstring to see what it scores."""
    unseen = [
        view for view in views.references
        if not view.has_chat_template and view.fingerprint not in _RENDERINGS_SHOWN
    ]  # fmt: skip
    if not unseen:
        return
    first_id = tokenized.tokenization.pair_ids[0]
    first = find_pairs(config, split, tokenized, {first_id})[first_id]
    for view in unseen:
        _RENDERINGS_SHOWN.add(view.fingerprint)
        _, chosen, _ = view.render(first)
        logger.warning(
            "Reference %r has no chat template: it reads each pair as plain text (a conversation as 'User: ...', "
            "'Assistant: ...' turns), its own BOS/EOS added as its tokenizer does. The first pair's chosen answer "
            "as it scores it: %r",
            view.name,
            chosen if len(chosen) <= 300 else chosen[:297] + "...",
        )


def report_overlap(
    config: MRPOConfig, eval_ids: Sequence[str], train_ids: Iterable[str] | None = None
) -> int:
    """How many of the eval split's pairs are also training pairs (the same pair id: the same prompt, chosen and
    rejected), said as a warning when any are: metrics on them measure memory, not generalisation.

    ``eval_ids`` are the eval pairs kept after tokenization, ``train_ids`` the training pairs; when the training
    split was not prepared (``mrpo evaluate``) its pairs are read again. Ids of pairs read rather than kept give the
    same answer: both splits are tokenized by the same rules, so a text dropped from one is dropped from the other.
    A training source that cannot be read is said, not raised (evaluation does not need it).
    """
    held_out = set(eval_ids)
    if train_ids is not None:
        shared = {pair_id for pair_id in train_ids if pair_id in held_out}
    else:
        try:
            shared = {pair_id for pair_id in _training_pair_ids(config) if pair_id in held_out}
        except DataError as error:
            logger.info("The eval pairs were not checked against the training pairs: %s", error)
            return 0
    overlapping = sum(1 for pair_id in eval_ids if pair_id in shared)
    if overlapping:
        logger.warning(overlap_message(overlapping, len(eval_ids), config.data.eval))
    return overlapping


def overlap_message(overlapping: int, total: int, eval_source: str | None = None) -> str:
    """ "42 of 96 eval pairs (44%) are also training pairs: ..."; a share that rounds to 0% or 100% but is neither
    is written <1% or >99%."""
    share = overlapping / total
    if 0 < share < 0.01:
        percent = "<1%"
    elif 0.99 < share < 1:
        percent = ">99%"
    else:
        percent = f"{share:.0%}"
    where = f" ({eval_source})" if eval_source else ""
    return (
        f"{overlapping} of {total} eval pairs{where} ({percent}) are also training pairs: held-out metrics on them "
        "are not held out. Use an eval file whose pairs are not in data.train."
    )


def _training_pair_ids(config: MRPOConfig) -> Iterable[str]:
    """The ids of the pairs a run on ``config`` trains on, before tokenization: its subsample when it has one."""
    if config.data.max_pairs is None:
        return (pair.pair_id for pair in stream_split(config, "train"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training run warned about its identical pairs
        return [pair.pair_id for pair in read_split(config, "train")]
