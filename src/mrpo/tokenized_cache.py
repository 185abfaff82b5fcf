"""Tokenized splits cached on disk, keyed by what decides their tokens: a run on the same data file, tokenizers and
settings opens the stored pairs instead of reading and tokenizing the data again.

A split's entry is ``cache_dir/tokenized-<key>/``: one ``token_store`` directory per distinct tokenizer
(``view-<k>/``) and ``split.json`` (the read's account, the drops, which view reads which directory). The key is the
sha256 of the content the caller passes (the data's identity, the read settings, every view's tokenizer fingerprint,
the limits). An entry is built in a temporary directory and renamed into place when complete, so a killed build
leaves nothing that could be opened; an entry that does not open (a file deleted by hand) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrpo.pairs import PairCounts, PairStream
from mrpo.token_store import PairWriter, StoredPairs
from mrpo.tokenization import ModelView, TokenizationResult, tokenize_for_models

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Version of this layout; part of every key."""

SPLIT_FILE = "split.json"


@dataclass
class CachedSplit:
    """One split's tokenized pairs as stored, the account of its read, and whether it was found or built."""

    tokenization: TokenizationResult
    counts: PairCounts
    directory: Path
    found: bool


def split_key(content: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps({"version": CACHE_VERSION, **content}, sort_keys=True).encode()
    ).hexdigest()


def open_or_tokenize(
    root: str | os.PathLike,
    content: dict[str, Any],
    views: Sequence[ModelView],
    stream: Callable[[], PairStream],
    *,
    max_length: Sequence[int | None],
    overflow: str,
) -> CachedSplit:
    """The split stored under ``root`` for ``content``; if absent, read ``stream()`` once, tokenizing for every view
    straight to disk (``tokenize_for_models`` with a ``PairWriter`` per tokenizer), and store it."""
    root = Path(root)
    directory = root / f"tokenized-{split_key(content)[:32]}"
    if (directory / SPLIT_FILE).is_file():
        try:
            return _open(directory, views, found=True)
        except (OSError, ValueError, KeyError) as error:
            logger.warning("Tokenizing again: %s does not open (%s).", directory, error)
            shutil.rmtree(directory, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    _sweep_abandoned_builds(root)
    building = Path(tempfile.mkdtemp(prefix=f".{directory.name}-{_HOST}-{os.getpid()}-", dir=root))
    try:
        pairs = stream()
        result = tokenize_for_models(
            pairs,
            views,
            max_length=max_length,
            overflow=overflow,  # type: ignore[arg-type]
            storage=lambda k: PairWriter(building / f"view-{k}"),
        )
        counts = pairs.counts()  # raises what an empty or all-invalid read raises
        account = {
            "content": content,
            "view_names": result.view_names,
            "owners": result.owners,
            "dropped": dict(result.dropped),
            "read": counts.to_dict(),
        }
        (building / SPLIT_FILE).write_text(json.dumps(account, indent=2, sort_keys=True), encoding="utf-8")
        building.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would keep other users of a shared cache out
        try:
            os.rename(building, directory)
        except OSError:
            if not (directory / SPLIT_FILE).is_file():
                raise
            # Another process stored the same entry first (it has the same content): use that one.
            shutil.rmtree(building, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return _open(directory, views, found=False)


_HOST = socket.gethostname().replace("-", "_")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sweep_abandoned_builds(root: Path) -> None:
    """Remove the temporary directories of builds on this host whose process is gone (killed, out of memory)."""
    for path in root.glob(f".tokenized-*-{_HOST}-*-*"):
        try:
            pid = int(path.name.split("-")[3])
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.warning("Removing %s: the build that wrote it was stopped before it finished.", path)
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue  # not a name we wrote, or another user's live process


def _open(directory: Path, views: Sequence[ModelView], *, found: bool) -> CachedSplit:
    account = json.loads((directory / SPLIT_FILE).read_text(encoding="utf-8"))
    owners = account["owners"]
    if len(owners) != len(views):
        raise ValueError(f"it holds {len(owners)} views, not {len(views)}")
    stored = {k: StoredPairs(directory / f"view-{k}") for k in sorted(set(owners))}
    if len({len(pairs) for pairs in stored.values()}) > 1:
        raise ValueError("its views hold different numbers of pairs")
    tokenization = TokenizationResult(
        view_names=[view.name for view in views],
        per_view=[stored[owner] for owner in owners],
        dropped=Counter(account["dropped"]),
        owners=owners,
    )
    return CachedSplit(tokenization, PairCounts.from_dict(account["read"]), directory, found)
