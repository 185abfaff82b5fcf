"""Everything between a preference file and token ids: reading sources, the row rules of the formats, pairs,
each model's rendering and tokenization, and where tokenized pairs live (memory, disk, the cache under
``cache_dir``).

This package imports nothing of ``mrpo`` but ``mrpo.errors``. Its modules are its homes; this face names what a
user of the package needs, imported on first use (``import mrpo.data`` stays light):

- ``sources``: ``load_pairs``, ``stream_pairs``, ``pairs_from_records``, ``source_identity``;
- ``rows``: ``RowError``, ``parse_row`` (the standard, conversational and implicit formats, HH-RLHF transcripts);
- ``pairs``: ``PreferencePair``, ``PairSet``, ``PairStream``, ``PairCounts``, ``compute_pair_id``, ``subsample``;
- ``tokenization``: ``ModelView``, ``tokenize_for_models``, ``TokenizationResult``, ``RenderError``;
- ``token_bound``: the characters-per-token bound that drops provably long pairs before tokenizing;
- ``token_store``: ``TokenizedPairs`` (memory), ``StoredPairs`` / ``PairWriter`` (disk);
- ``token_cache``: ``open_or_tokenize``, ``CachedSplit`` (a split's tokens under ``cache_dir``).
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "load_pairs": "sources",
    "stream_pairs": "sources",
    "pairs_from_records": "sources",
    "source_identity": "sources",
    "RowError": "rows",
    "parse_row": "rows",
    "PreferencePair": "pairs",
    "PairSet": "pairs",
    "PairStream": "pairs",
    "PairCounts": "pairs",
    "compute_pair_id": "pairs",
    "subsample": "pairs",
    "ModelView": "tokenization",
    "tokenize_for_models": "tokenization",
    "TokenizationResult": "tokenization",
    "RenderError": "tokenization",
    "TokenizedPairs": "token_store",
    "StoredPairs": "token_store",
    "PairWriter": "token_store",
    "open_or_tokenize": "token_cache",
    "CachedSplit": "token_cache",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
