"""The fast path: which row layout, compilation and length bucket a run trains and scores with, chosen per device
where the policy section leaves them to "auto", with the reason for each choice (``mrpo train --dry-run`` prints
it; every choice is overridden by setting its key).

- **Rows.** A document-aware attention kernel (flex or flash attention) skips the work across packed sequences, so
  there the 2B sequences of a batch are packed into one row (``policy.padding_free``). On the CPU (sdpa, eager)
  each pair is one prefix-shared row, its prompt computed once (``policy.prefix_shared``): the same log-probs with
  fewer tokens, the fastest layout measured there (docs/results.md, "Speed"). On CUDA with sdpa or eager the rows
  stay padded: prefix-shared rows there are not measured yet, and their dense 4D mask rules out sdpa's flash
  kernel. Flash attention cannot take the prefix-shared mask, so it never gets those rows. The references'
  precompute follows the same rule (``references[].prefix_shared``).
- **Compilation.** On CUDA with packed rows the decoder layers are compiled (``policy.compile``); compiling costs a
  minute or two once and pays back over a run. On the CPU they are not compiled.
- **Bucket.** Compiled layers need repeating shapes: each row's length is rounded up by ``batching.bucket_length``
  (four lengths per doubling) unless ``policy.pad_to_multiple_of`` is set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from mrpo.config.schema import AutoBool, PolicyConfig
from mrpo.errors import ConfigError

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

    def padded_instead(self, refusal: str) -> FastPath:
        """These choices with padded rows, where the loaded model cannot take prefix-shared ones."""
        return dataclasses.replace(
            self, rows="padded", reasons=(f"padded rows (auto: {refusal})", *self.reasons[1:])
        )


def choose_fast_path(policy: PolicyConfig, *, cuda: bool) -> FastPath:
    """The rows, compilation and bucket for ``policy`` on CUDA (``cuda``) or the CPU; a setting that is not "auto"
    is kept as it is."""
    kernel = policy.attn_implementation or "sdpa"
    document_aware = padding_free_enabled("auto", policy.attn_implementation)
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
    if policy.padding_free == "auto" and document_aware:
        return "packed", f"packed rows (auto: {kernel} skips the work across packed sequences)"
    if policy.prefix_shared == "auto" and shared_rows_pay(kernel, cuda=cuda):
        return "prefix_shared", f"prefix-shared rows (auto: {kernel} on the CPU; each prompt computed once)"
    automatic = "auto" in (policy.padding_free, policy.prefix_shared)
    return "padded", "padded rows" + (
        f" (auto: {kernel} on {'CUDA' if cuda else 'the CPU'})" if automatic else " (set)"
    )


def shared_rows_pay(kernel: str | None, *, cuda: bool) -> bool:
    """Whether "auto" gives prefix-shared rows: on the CPU, with a kernel that takes their 4D mask."""
    return not cuda and not (kernel or "sdpa").startswith(("flash", "paged"))


def reference_rows_shared(setting: AutoBool, *, cuda: bool) -> bool:
    """``references[].prefix_shared`` resolved for a precompute on CUDA (``cuda``) or the CPU (references load
    with transformers' default attention kernel)."""
    return shared_rows_pay(None, cuda=cuda) if setting == "auto" else bool(setting)


def padding_free_enabled(setting: AutoBool, attn_implementation: str | None) -> bool:
    """Whether ``policy.padding_free`` packs: "auto" packs where the attention kernel skips the work across packed
    sequences."""
    if setting == "auto":
        return attn_implementation in DOCUMENT_AWARE_ATTENTION
    return bool(setting)


def use_shared_rows(setting: AutoBool, chosen: bool, refusal: str | None, *, key: str) -> bool:
    """Whether a loaded model scores prefix-shared rows: the per-device choice (``chosen``), unless the model
    cannot (``refusal``, from ``logprobs.prefix_shared_refusal``): then padded rows under "auto", and an error when
    ``key`` was set to true."""
    if not chosen or refusal is None:
        return chosen
    if setting is True:
        raise ConfigError(f"{key} is true, but {refusal}: set it to false or auto", key=key)
    return False
