"""The fast path: which row layout, compilation and length bucket a run trains and scores with, chosen per device
where the policy section leaves them to "auto", with the reason for each choice (``mrpo train --dry-run`` prints
it; every choice is overridden by setting its key).

- **Rows.** A document-aware attention kernel (flex or flash attention) skips the work across packed sequences, so
  there the 2B sequences of a batch are packed into one row (``policy.padding_free``). Elsewhere (sdpa, eager: the
  CPU, and a GPU without those kernels) each pair is one prefix-shared row, its prompt computed once
  (``policy.prefix_shared``): the same log-probs with fewer tokens. Flash attention cannot take the prefix-shared
  mask, so it never gets those rows.
- **Compilation.** On CUDA with packed rows the decoder layers are compiled (``policy.compile``); compiling costs a
  minute or two once and pays back over a run. On the CPU they are not compiled.
- **Bucket.** Compiled layers need repeating shapes: each row's length is rounded up by ``batching.bucket_length``
  (four lengths per doubling) unless ``policy.pad_to_multiple_of`` is set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from mrpo.config.schema import PolicyConfig

DOCUMENT_AWARE_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")
"""Attention kernels that skip the work between packed sequences (transformers builds their document mask from
position ids); with sdpa or eager the mask of a packed row is dense, quadratic in the row."""

Rows = Literal["padded", "packed", "prefix_shared"]


@dataclass(frozen=True)
class FastPath:
    """What a run trains and scores with, and why."""

    rows: Rows
    compile: bool
    bucket: bool
    """Round every batch's row length up to a bucket (``batching.bucket_length``), not only token-budget ones."""
    reasons: tuple[str, ...]

    def apply(self, policy: PolicyConfig) -> PolicyConfig:
        """``policy`` with its "auto" settings replaced by these choices."""
        return dataclasses.replace(
            policy,
            padding_free=self.rows == "packed",
            prefix_shared=self.rows == "prefix_shared",
            compile=self.compile,
        )

    def text(self) -> str:
        return "fast path: " + "; ".join(self.reasons)


def choose_fast_path(policy: PolicyConfig, *, cuda: bool) -> FastPath:
    """The rows, compilation and bucket for ``policy`` on CUDA (``cuda``) or the CPU; a setting that is not "auto"
    is kept as it is."""
    kernel = policy.attn_implementation or "sdpa"
    document_aware = kernel in DOCUMENT_AWARE_ATTENTION
    rows, why_rows = _rows(policy, kernel, document_aware, cuda)
    if policy.compile != "auto":
        compile_layers, why_compile = (
            bool(policy.compile),
            f"compile {'on' if policy.compile else 'off'} (set)",
        )
    elif cuda and rows == "packed":
        compile_layers, why_compile = True, "compile on (auto: CUDA with packed rows)"
    else:
        compile_layers, why_compile = (
            False,
            f"compile off (auto: {'CUDA without packed rows' if cuda else 'CPU'})",
        )
    bucket = compile_layers and policy.pad_to_multiple_of is None
    if bucket:
        why_bucket = "rows rounded to four lengths per doubling (compiled layers need repeating shapes)"
    elif policy.pad_to_multiple_of:
        why_bucket = f"rows rounded to multiples of {policy.pad_to_multiple_of} (set)"
    else:
        why_bucket = "rows at their own length" + (
            " (token-budget micro-batches rounded to four lengths per doubling)"
            if policy.micro_batch_tokens
            else ""
        )
    return FastPath(rows, compile_layers, bucket, (why_rows, why_compile, why_bucket))


def _rows(policy: PolicyConfig, kernel: str, document_aware: bool, cuda: bool) -> tuple[Rows, str]:
    if policy.padding_free is True:
        return "packed", "packed rows (policy.padding_free: true)"
    if policy.prefix_shared is True:
        return "prefix_shared", "prefix-shared rows (policy.prefix_shared: true)"
    packed_auto = policy.padding_free == "auto"
    shared_auto = policy.prefix_shared == "auto"
    if packed_auto and document_aware:
        return "packed", f"packed rows (auto: {kernel} skips the work across packed sequences)"
    if shared_auto and kernel not in ("flash_attention_2", "flash_attention_3"):
        where = "CUDA" if cuda else "CPU"
        return "prefix_shared", f"prefix-shared rows (auto: {kernel} on {where}; each prompt computed once)"
    return "padded", "padded rows" + (" (set)" if not (packed_auto or shared_auto) else f" (auto: {kernel})")
