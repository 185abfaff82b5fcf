"""A model's weights as the caches see them: their identity (``model_fingerprint``, part of every reference
store's key) and the token ids they can embed (``check_token_ids``, before a forward).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

from mrpo.errors import CacheError, ModelSourceError

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_FULL_HASH_LIMIT = 1 << 30  # weight files up to 1 GiB in all are hashed whole; larger ones are sampled


def model_fingerprint(model: str, hash_weights: str = "auto") -> str:
    """Identity of a model's weights: content hashes of its weight files (local, or a hub snapshot's).

    ``hash_weights="auto"`` hashes the files whole up to 1 GiB in all; above that each weight file is identified by
    its size and 64 evenly spaced 1 MiB samples (a line in the log says so): an edit in place between the samples
    would keep the old cache. ``"full"`` always reads every byte.
    """
    path = Path(model)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
    else:
        files = _hub_snapshot_files(model)
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)
    sampled = hash_weights != "full" and total > _FULL_HASH_LIMIT
    if sampled:
        logger.info(
            "Fingerprinting %s (%.1f GiB) from 64 sampled MiB per weight file plus its size; set the reference's "
            "hash_weights: full to hash every byte.",
            model,
            total / 2**30,
        )
    for file in files:
        digest.update(file.name.encode())
        whole = not sampled or file.suffix == ".json"
        stat = file.stat()
        digest.update(_file_digest(file.resolve(), stat.st_size, stat.st_mtime_ns, whole).encode())
    return digest.hexdigest()


def _hub_snapshot_files(model_id: str) -> list[Path]:
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(
            snapshot_download(model_id, allow_patterns=["*.json", *(f"*{s}" for s in _WEIGHT_SUFFIXES)])
        )
    except Exception as error:  # noqa: BLE001 - any hub failure becomes one clear message
        raise CacheError(
            f"model {model_id!r} is neither a local file/directory nor a reachable hub model ({error}). "
            "Point the reference at a local directory or .gguf file, or connect to the hub."
        ) from error
    return sorted(p for p in snapshot.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")


@functools.lru_cache(maxsize=256)
def _file_digest(file: Path, size: int, mtime_ns: int, whole: bool) -> str:
    """sha256 of a file (or of samples of it); memoised per process by path, size and modification time, so the
    train and eval splits of one run do not hash the same weights twice."""
    digest = hashlib.sha256(str(size).encode())
    with file.open("rb") as handle:
        if whole:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        else:
            # Very large weights: 64 evenly spaced 1 MiB samples plus the size identify a checkpoint in practice
            # without reading tens of GB on every run.
            size = file.stat().st_size
            for i in range(64):
                handle.seek(size * i // 64)
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def check_token_ids(model, name: str, input_ids: torch.Tensor) -> None:
    """Refuse token ids past the model's embedding rows before the forward (past them is an index error deep in
    torch, on CUDA a device assert): its tokenizer is not the one it was built for."""
    rows = model.get_input_embeddings().num_embeddings
    top = int(input_ids.max()) if input_ids.numel() else -1
    if top >= rows:
        path = getattr(model, "name_or_path", "") or type(model).__name__
        raise ModelSourceError(
            f"{name} ({path}): token id {top} is past the {rows} rows of the model's embedding table: its "
            "tokenizer (or pad token) is not the one the model was built for; set the reference's tokenizer to the "
            "model's own"
        )
