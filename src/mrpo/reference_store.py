"""One reference's store on disk: its key (everything except the text that changes its log-probs), its shards of
entries ``pair_id -> (chosen, rejected log-prob, chosen, rejected token count)`` with the tags of the tokens each
scored, and the lock a run holds while it fills it. ``references`` fills and serves the stores.

Each shard is written to a temporary name and renamed (atomic), and its file name carries the sha256 of its bytes,
so a killed run resumes from the finished shards and a truncated, corrupt or foreign shard is detected, removed
and recomputed, never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mrpo.errors import CacheError, write_failure
from mrpo.logprobs import LOGPROB_CODE_VERSION
from mrpo.pair_table import PairTable

logger = logging.getLogger(__name__)

ENTRY_COLUMNS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")
ENTRY_WIDTH = len(ENTRY_COLUMNS)
"""An entry is four float32 numbers (16 bytes): the log-probs are float32 when computed, and a token count is exact
in float32 below 2**24 tokens a sequence."""

TAGS_COLUMN = "token_tags"
"""A shard's column of the 64-bit tags of the tokens each entry scored (stored as int64)."""


@dataclass(frozen=True)
class StoreKey:
    """Everything except the text that changes a reference's log-probs. Content only: the same weights under
    another path or another reference name share one store (the name is a label in reports)."""

    model_fingerprint: str
    tokenizer_fingerprint: str
    max_length: int | None
    overflow: str
    dtype: str
    code_version: int = LOGPROB_CODE_VERSION
    tokens: str = "own"  # whose token ids were scored: its own or the policy's (references[].tokens)

    def content(self) -> dict:
        """What the digest hashes: ``tokens`` only when not "own", so stores older than the option keep their keys."""
        return {name: value for name, value in asdict(self).items() if name != "tokens" or value != "own"}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.content(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ReferenceStore:
    """One reference's entries ``pair_id -> (chosen, rejected log-prob, chosen, rejected token count)``, held as a
    ``PairTable`` (16 bytes of numbers and 8 of key an entry)."""

    directory: Path
    key: StoreKey
    entries: PairTable = field(default_factory=lambda: PairTable(ENTRY_WIDTH, np.float32))
    discarded_shards: int = 0

    @classmethod
    def open(cls, root: Path, key: StoreKey) -> ReferenceStore:
        directory = store_directory(root, key)
        key_file = directory / "key.json"
        with _writing_store(directory):
            directory.mkdir(parents=True, exist_ok=True)
            if not key_file.exists():
                _atomic_write_bytes(key_file, json.dumps(key.content(), indent=2, sort_keys=True).encode())
        store = cls(directory, key)
        store.reload()
        return store

    def reload(self) -> None:
        """Read every valid shard; delete shards that are corrupt or were written for another key."""
        self.entries.clear()
        for shard in sorted(self.directory.glob("shard-*.pt")):
            content = shard.read_bytes()
            if not shard.stem.endswith(hashlib.sha256(content).hexdigest()[:16]):
                self._discard(shard, "its content does not match its checksum")
                continue
            try:
                payload = torch.load(shard, weights_only=True)
            except Exception as error:  # noqa: BLE001 - a shard that does not load is corrupt, whatever the cause
                self._discard(shard, f"it does not load ({error})")
                continue
            if not isinstance(payload, dict) or payload.get("key") != self.key.digest:
                self._discard(shard, "it was written for another model, tokenizer or setting")
                continue
            if TAGS_COLUMN not in payload:
                self._discard(shard, "it was written before entries were tagged with the tokens they scored")
                continue
            try:
                pair_ids = list(payload["pair_ids"])
                columns = [payload[name].float().numpy() for name in ENTRY_COLUMNS]
                tags = payload[TAGS_COLUMN].numpy().view(np.uint64)
                if any(column.shape != (len(pair_ids),) for column in [*columns, tags]):
                    raise ValueError(f"{len(pair_ids)} pair ids but columns of {[c.shape for c in columns]}")
            except Exception as error:  # noqa: BLE001 - missing fields or ragged columns: not a shard we can use
                self._discard(
                    shard, f"its content is not a well-formed shard ({type(error).__name__}: {error})"
                )
                continue
            self.entries.add(pair_ids, np.stack(columns, axis=1), tags)

    def _discard(self, shard: Path, why: str) -> None:
        logger.warning("Recomputing %s: %s.", shard, why)
        shard.unlink(missing_ok=True)
        self.discarded_shards += 1

    def write_shard(
        self, pair_ids: Sequence[str], values: torch.Tensor, tokens: torch.Tensor, tags: np.ndarray
    ) -> Path:
        """Persist one shard atomically. ``values`` is (N, 2) float32 log-probs, ``tokens`` (N, 2) int64 token
        counts, ``tags`` (N,) uint64 the tags of the tokens scored (``pair_token_tags``)."""
        tags = np.ascontiguousarray(tags, dtype=np.uint64)
        payload = {
            "key": self.key.digest,
            "pair_ids": list(pair_ids),
            "chosen_logps": values[:, 0].contiguous(),
            "rejected_logps": values[:, 1].contiguous(),
            "chosen_tokens": tokens[:, 0].contiguous(),
            "rejected_tokens": tokens[:, 1].contiguous(),
            TAGS_COLUMN: torch.from_numpy(tags.view(np.int64).copy()),
        }
        temporary = None
        try:
            with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp", delete=False) as handle:
                temporary = Path(handle.name)
                torch.save(payload, handle)
            checksum = hashlib.sha256(temporary.read_bytes()).hexdigest()[:16]
            final = self.directory / f"shard-{time.time_ns()}-{os.getpid()}-{checksum}.pt"
            os.replace(temporary, final)
        except OSError as error:  # a full disk, a read-only cache: no half-written file left behind
            if temporary is not None:
                temporary.unlink(missing_ok=True)
            raise CacheError(
                f"cannot write a shard of the reference store {self.directory}: {error.strerror or error}. "
                "Free space there or point cache_dir elsewhere; the shards written so far are kept (a rerun "
                "resumes)"
            ) from error
        self.entries.add(list(pair_ids), torch.cat([values.float(), tokens.float()], dim=1).numpy(), tags)
        return final

    def missing(self, pair_ids: Sequence[str], tags: np.ndarray | None = None) -> list[str]:
        return self.entries.missing(pair_ids, tags)


@contextlib.contextmanager
def _writing_store(directory: Path):
    """A store's directory, key or lock that cannot be written for want of space or permission: one CacheError."""
    try:
        yield
    except OSError as error:
        message = write_failure(
            error,
            f"the reference store {directory}",
            no_space="free space there or point cache_dir elsewhere",
            not_writable="point cache_dir at a writable directory",
        )
        if message is None:
            raise
        raise CacheError(message) from error


def store_directory(root: Path, key: StoreKey) -> Path:
    """Where the store of ``key`` lives under the cache root."""
    return root / f"store-{key.digest}"


def _atomic_write_bytes(path: Path, content: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        handle.write(content)
    os.replace(handle.name, path)


STORE_LOCK = ".lock"
"""The file in a store whose lock (``fcntl.flock``) a run's main process holds while it fills the store."""


@contextlib.contextmanager
def store_lock(directory: Path, *, enabled: bool):
    if not enabled:
        yield
        return
    with _writing_store(directory):
        directory.mkdir(parents=True, exist_ok=True)
        lock = os.open(directory / STORE_LOCK, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("Waiting for another run scoring into %s (its pairs are then reused).", directory)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)
