"""One split ready to train or evaluate on: the split read and tokenized jointly (``splits.py``), every reference's
cache filled for its pairs (``references.py``), and the K cached columns attached to the policy's tokens
(``collator.PreferenceDataset``). The layer under the pipeline steps and ``assemble.py``, which both start here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mrpo.collator import PreferenceDataset
from mrpo.config.schema import MRPOConfig
from mrpo.data.pairs import PairCounts, PairSet, PreferencePair
from mrpo.data.tokenization import TokenizationResult
from mrpo.references import ReferenceCache, precompute
from mrpo.splits import Views, load_views, show_plain_renderings, stream_split, tokenize_split


@dataclass
class PreparedSplit:
    """One split, ready to train or evaluate on."""

    counts: PairCounts
    tokenization: TokenizationResult
    cache: ReferenceCache
    dataset: PreferenceDataset
    views: Views
    split: str
    pairs: PairSet | None = None
    """The pairs in memory, or None when the split's tokens came from the disk cache (see ``TokenizedSplit``)."""
    read_again: Callable[[], Iterable[PreferencePair]] | None = None

    def text_pairs(self) -> Iterable[PreferencePair]:
        """Every pair of the split with its text and metadata: from memory, or read again from the source."""
        if self.pairs is not None:
            return self.pairs
        assert self.read_again is not None
        return self.read_again()

    def summary(self) -> str:
        return "\n".join([self.counts.summary(), self.tokenization.summary(), self.cache.summary()])


def prepare_split(
    config: MRPOConfig,
    split: str,
    views: Views | None = None,
    *,
    show_progress: bool = True,
    pairs: PairSet | None = None,
) -> PreparedSplit:
    """Read, tokenize jointly, fill the reference cache, and build the training dataset for one split.

    ``pairs``: the split already in memory (``splits.read_records``) instead of read from its source."""
    views = views or load_views(config)
    tokenized = tokenize_split(config, split, views, pairs)
    show_plain_renderings(config, split, views, tokenized)
    cache = precompute(
        tokenized.references,
        views.references,
        tokenized.tokenization.per_view[1:],
        config.cache_dir,
        overflow=config.data.overflow,
        show_progress=show_progress,
    )
    columns = cache.columns(tokenized.tokenization.pair_ids)
    dataset = PreferenceDataset(
        tokenized.tokenization.per_view[0],
        columns["reference_chosen_logps"],
        columns["reference_rejected_logps"],
    )
    return PreparedSplit(
        tokenized.counts,
        tokenized.tokenization,
        cache,
        dataset,
        views,
        split,
        tokenized.pairs,
        lambda: stream_split(config, split),
    )
