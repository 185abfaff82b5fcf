"""Sequence log-probs: the ONE function from a causal LM and a token batch to per-sequence completion log-probs.

The same `sequence_logps` serves the reference precompute (under ``torch.no_grad``), policy training (with
gradient, through DDP / accelerate / PEFT wrappers) and evaluation, so the numbers cannot drift apart; its row
layouts, padding-free (``packed_sequence_logps``) and prefix-shared (``prefix_shared_sequence_logps``: a pair's
prompt computed once), give the same numbers up to float rounding through the same LM-head code.

How it avoids float32 logits for the whole batch x sequence x vocabulary:

1. The top-level model is called as usual (``model(...)``, so DDP's gradient sync and PEFT's adapters apply) with
   ``logits_to_keep=1``: its own LM head runs on the last position only.
2. A forward hook on the decoder (``get_decoder()`` of the unwrapped model) takes the final hidden states — still
   inside the model's forward, where sharded parameters are gathered — and projects only the positions that predict
   completion tokens through ``get_output_embeddings()`` (a LoRA-wrapped head included), ``chunk_size`` positions
   at a time (by default sized by the vocabulary: ``default_chunk_size``), with the log-softmax in float32. With
   gradient, each chunk is recomputed in the backward pass (activation checkpointing), so one chunk of logits
   lives at a time in both passes; without, the log-sum-exp runs in place on the chunk's logits.
3. The head transforms that model forwards apply to logits are reproduced from the config, as TRL's fused LM head
   does: ``final_logit_softcapping`` (Gemma 2/3/3n/4, NanoChat, ...) or ``logits_soft_cap`` (RecurrentGemma), and a
   scale (``logit_scale`` for Cohere, ``output_multiplier``, ``lm_head_multiplier``, ``1 / logits_scaling`` for
   Granite and MiniCPM3, ``logits_scaling`` for HyperCLOVA X).
4. Safety net: when the head is in eval mode (always during precompute) the model's own last-position logits are
   compared with the reproduced head's; a model whose forward does something else to its logits raises an error
   instead of returning wrong numbers. The comparison costs one host sync per call; inside
   ``deferred_head_checks()`` it stays on the device and the caller checks every call's at once
   (``raise_if_head_differs``): precompute does so once per shard.

Models whose ``config.model_type`` is in ``FULL_LOGITS_MODEL_TYPES`` (their head does something not reproduced
here), models whose forward takes no ``logits_to_keep`` and models without a separate decoder are scored from the
model's own full logits instead: the model materialises ``(batch, sequence, vocabulary)`` logits in its dtype, and
only the float32 log-softmax is chunked.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mrpo.batching import prediction_positions, prefix_shared_attention

LOGPROB_CODE_VERSION = 1
"""Bumped whenever a change here changes the numbers; part of the reference cache key."""

FULL_LOGITS_MODEL_TYPES: set[str] = {
    "inkling_text",  # slices a padded vocabulary out of the logits, which changes the softmax normaliser
    "xlstm",  # soft-caps logits chunk-wise and differently in training and inference
}
"""``config.model_type`` values scored from the model's own full logits (see the module docstring)."""


LOGITS_CHUNK_ELEMENTS = 2**26
"""Float32 logits per LM-head chunk by default (positions x vocabulary): 256 MiB, whatever the vocabulary."""


def default_chunk_size(vocabulary: int) -> int:
    """Completion positions per LM-head chunk for a ``vocabulary``-word head: ``LOGITS_CHUNK_ELEMENTS / vocabulary``,
    at least 1 (256 rows for Gemma-3's 262,144 words, 2,048 for 32,768). Chunking splits positions only:
    the numbers do not depend on it."""
    return max(1, LOGITS_CHUNK_ELEMENTS // max(1, int(vocabulary)))


@dataclass(frozen=True)
class SequenceLogps:
    """Per-sequence sums of completion-token log-probs."""

    logps: Tensor
    """(N,) float32: sum over completion tokens of log p(token | earlier tokens); no length normalisation."""
    token_counts: Tensor
    """(N,) int64: number of completion tokens summed."""


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    prediction_positions: Tensor | None = None,
    chunk_size: int | None = None,
) -> SequenceLogps:
    """Sum of completion-token log-probs of each sequence under ``model``.

    Args:
        model: a causal LM, possibly wrapped (PEFT, DDP, accelerate, DeepSpeed, ``torch.compile``); any dtype.
            Called once, through its top-level forward, with ``use_cache=False``. Gradient flows when enabled.
        input_ids: (N, T) int64 token ids, padded on either side.
        attention_mask: (N, T) 1 for real tokens, 0 for padding.
        completion_mask: (N, T) 1 where the token is a completion token, whose log-prob given the tokens before
            it counts; must be 0 at position 0 (nothing predicts it) and on padding.
        prediction_positions: optional (2, M) rows and columns of the hidden states that predict completion
            tokens, as ``batching.pad_batch`` computes them on the host; when given, ``completion_mask`` is
            trusted and neither checked nor searched on the device (no host-device sync).
        chunk_size: completion positions projected through the LM head at a time; bounds the float32 logits to
            (chunk_size, vocabulary). Default: ``default_chunk_size(vocabulary)`` (256 MiB of logits a chunk).

    Returns:
        ``SequenceLogps`` with ``logps`` (N,) float32 and ``token_counts`` (N,) int64.
    """
    if not (input_ids.shape == attention_mask.shape == completion_mask.shape) or input_ids.ndim != 2:
        raise ValueError(
            "input_ids, attention_mask and completion_mask must share one (N, T) shape, got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(completion_mask.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    completion_mask = completion_mask.bool()
    if prediction_positions is None:
        if completion_mask[:, 0].any():
            raise ValueError(
                "completion_mask is 1 at position 0, where no earlier token predicts the completion"
            )
        if (completion_mask & ~attention_mask.bool()).any():
            raise ValueError("completion_mask marks padding tokens (attention_mask 0) as completion tokens")

    # Positions count real tokens only, so a left-padded sequence sees the positions it would see alone (this
    # matters for absolute position embeddings; rotary ones are shift-invariant anyway).
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    rows, cols = _prediction_rows_cols(completion_mask, prediction_positions, input_ids.device)
    # Hidden state (row, col) predicts the token at (row, col + 1).
    token_logps = _completion_token_logps(
        model, model_inputs, rows, cols, input_ids[rows, cols + 1], chunk_size
    )
    logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    logps = logps.index_add(0, rows, token_logps)
    return SequenceLogps(logps=logps, token_counts=completion_mask.sum(dim=1).long())


def packed_sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    completion_mask: Tensor,
    sequence_index: Tensor,
    num_sequences: int,
    *,
    prediction_positions: Tensor | None = None,
    chunk_size: int | None = None,
) -> SequenceLogps:
    """Padding-free variant of ``sequence_logps``: sequences packed one after another in rows.

    The model sees no attention mask and position ids that restart at 0 for every sequence; transformers then
    builds a document mask from the position ids, so a token attends only to earlier tokens of its own sequence
    (with flex_attention or flash attention this also skips the work; with sdpa/eager the mask is dense).

    Args:
        input_ids: (R, T) int64, R rows of packed sequences (usually R = 1).
        position_ids: (R, T) position of each token within its sequence, 0 at each sequence's first token.
        completion_mask: (R, T) 1 at completion tokens; never at a sequence's first token.
        sequence_index: (R, T) int64, which output sequence (0..num_sequences-1) a token belongs to; -1 for
            filler tokens (bucket padding), which must form their own document (positions restarting at 0).
        num_sequences: N, the number of packed sequences.
        prediction_positions: optional (2, M), as in ``sequence_logps`` (``batching.pack_sequences`` computes it).

    Returns:
        ``SequenceLogps`` with ``logps`` (N,) float32 and ``token_counts`` (N,) int64, in sequence_index order.
    """
    if not (input_ids.shape == position_ids.shape == completion_mask.shape == sequence_index.shape):
        raise ValueError(
            "input_ids, position_ids, completion_mask and sequence_index must share one (R, T) shape, got "
            f"{tuple(input_ids.shape)}, {tuple(position_ids.shape)}, {tuple(completion_mask.shape)}, "
            f"{tuple(sequence_index.shape)}"
        )
    completion_mask = completion_mask.bool()
    model_inputs = {"input_ids": input_ids, "attention_mask": None, "position_ids": position_ids}
    rows, cols = _prediction_rows_cols(completion_mask, prediction_positions, input_ids.device)
    token_logps = _completion_token_logps(
        model, model_inputs, rows, cols, input_ids[rows, cols + 1], chunk_size
    )
    return _sums_by_owner(token_logps, sequence_index[rows, cols + 1], num_sequences)


def prefix_shared_sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    segment_ids: Tensor,
    prediction_positions: Tensor,
    prediction_targets: Tensor,
    prediction_owners: Tensor,
    num_sequences: int,
    *,
    chunk_size: int | None = None,
) -> SequenceLogps:
    """Prefix-shared variant of ``sequence_logps``: one row per pair, its prompt computed once.

    The rows are ``batching.prefix_shared_batch``'s: [shared prefix | chosen tail | rejected tail], the rejected
    tail's positions continuing from the prefix and a 4D mask (``batching.prefix_shared_attention``, expanded here
    on the device) that keeps it from seeing the chosen tail. Every token then sees what it sees in its own padded
    row at the same positions, so the log-probs are the padded path's up to float rounding.

    The mask reaches the attention as transformers' custom 4D mask: an additive float mask (0 where allowed, the
    dtype's minimum elsewhere), which eager, sdpa and flex attention all add to the scores, and which
    ``transformers.masking_utils.create_causal_mask`` returns as it is ("an already prepared 4D mask"). Flash
    attention takes no such mask and is refused. Models with sliding-window layers get the window applied here
    (in positions) and, where they mix full and sliding layers, the masks keyed by layer type, as their forward
    takes a mapping ``{"full_attention": ..., "sliding_attention": ...}`` in place of the 2D mask.

    Args:
        input_ids, position_ids, segment_ids: (B, T) int64 as ``prefix_shared_batch`` returns them.
        prediction_positions: (2, M) rows and columns of the states that predict completion tokens.
        prediction_targets: (M,) the token each predicts; prediction_owners: (M,) its sequence (0..N-1).
        num_sequences: N = 2B: the chosen sequences of the B pairs, then their rejected ones.

    Returns:
        ``SequenceLogps`` with ``logps`` (N,) float32 and ``token_counts`` (N,) int64, in the order the padded
        and packed paths use (chosen 0..B-1, then rejected).
    """
    if not (input_ids.shape == position_ids.shape == segment_ids.shape) or input_ids.ndim != 2:
        raise ValueError(
            "input_ids, position_ids and segment_ids must share one (B, T) shape, got "
            f"{tuple(input_ids.shape)}, {tuple(position_ids.shape)}, {tuple(segment_ids.shape)}"
        )
    device = input_ids.device
    mask = prefix_shared_masks(unwrap_model(model), segment_ids, position_ids)
    model_inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
    rows, cols = prediction_positions.to(device, non_blocking=True)
    targets = prediction_targets.to(device, non_blocking=True)
    token_logps = _completion_token_logps(model, model_inputs, rows, cols, targets, chunk_size)
    return _sums_by_owner(token_logps, prediction_owners.to(device, non_blocking=True), num_sequences)


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
"""``config.layer_types`` entries prefix-shared rows know how to mask; another (chunked, linear) is refused."""


def prefix_shared_refusal(base: nn.Module) -> str | None:
    """Why ``base`` cannot score prefix-shared rows, or None when it can: its forward must hand a 4D mask to an
    attention kernel that applies it (transformers' attention interface, ``_supports_attention_backend``: not a
    recurrent model such as Mamba, RWKV or xLSTM, which drop the mask, nor one that builds its own bias from a 2D
    mask, as Bloom's ALiBi), with sdpa, eager or flex attention, and only full or sliding attention layers."""
    model = unwrap_model(base)
    config = getattr(model, "config", None)
    if not getattr(type(model), "_supports_attention_backend", False):
        return f"{type(model).__name__} does not take a custom 4D attention mask"
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation not in ("sdpa", "eager", "flex_attention"):
        return (
            "prefix-shared rows need an attention kernel that takes a 4D mask (sdpa, eager, flex_attention), "
            f"not {implementation!r}"
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    unknown = sorted(set(getattr(text_config, "layer_types", None) or ()) - set(ATTENTION_LAYER_TYPES))
    if unknown:
        return f"prefix-shared rows cannot mask {', '.join(unknown)} layers; use padded rows"
    return None


def prefix_shared_masks(
    base: nn.Module, segment_ids: Tensor, position_ids: Tensor
) -> Tensor | dict[str, Tensor]:
    """The additive 4D mask(s) of prefix-shared rows for ``base`` (see ``prefix_shared_sequence_logps``)."""
    refusal = prefix_shared_refusal(base)
    if refusal is not None:
        raise ValueError(refusal)
    config = base.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    embeddings = base.get_input_embeddings().weight
    dtype = (
        embeddings.dtype if embeddings.is_floating_point() else torch.float32
    )  # as transformers' own masks
    # sdpa takes a boolean mask (True: attend), a quarter of a float32 one's bytes; eager and flex add it.
    sdpa = (getattr(base.config, "_attn_implementation", None) or "sdpa") == "sdpa"
    allowed = prefix_shared_attention(segment_ids)
    full = allowed if sdpa else _additive(allowed, dtype)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return full
    # transformers' sliding window keeps key k for query q when q - k < window; here in positions, so that the
    # rejected tail counts its distance to the prefix as in its own padded row (int32: half the (B, 1, T, T) bytes).
    positions = position_ids.int()
    slides = allowed & (positions[:, None, :, None] - positions[:, None, None, :] < window)
    windowed = slides if sdpa else _additive(slides, dtype)
    if layer_types is None:  # every layer slides (Mistral-like)
        return windowed
    return {"full_attention": full, "sliding_attention": windowed}


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as an additive one: 0 where allowed, the dtype's minimum elsewhere (transformers' eager mask),
    in one (B, 1, T, T) allocation."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _sums_by_owner(token_logps: Tensor, owners: Tensor, num_sequences: int) -> SequenceLogps:
    """Token log-probs (M,) summed, and counted, into the sequences ``owners`` (M,) names."""
    logps = torch.zeros(num_sequences, dtype=torch.float32, device=token_logps.device)
    logps = logps.index_add(0, owners, token_logps)
    counts = torch.zeros(num_sequences, dtype=torch.long, device=token_logps.device)
    counts = counts.index_add(0, owners, torch.ones_like(owners))
    return SequenceLogps(logps=logps, token_counts=counts)


def _prediction_rows_cols(
    completion_mask: Tensor, positions: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Rows and columns of the hidden states that predict completion tokens: the host's, or found here."""
    if positions is None:
        positions = prediction_positions(completion_mask)
    rows, cols = positions.to(device, non_blocking=True)  # no wait: nothing reads them on the host
    return rows, cols


def _completion_token_logps(
    model: nn.Module,
    model_inputs: dict[str, Tensor | dict[str, Tensor] | None],
    rows: Tensor,
    cols: Tensor,
    targets: Tensor,
    chunk_size: int | None,
) -> Tensor:
    """log p(target) (M,) float32 predicted by the hidden states at (rows, cols) of one forward of ``model``."""
    base = unwrap_model(model)
    head = _reproducible_head(base)
    if head is None:
        logits = model(**model_inputs, use_cache=False).logits
        token_logps = _chunked_target_logps(logits, rows, cols, targets, _to_float32, chunk_size)
    else:
        token_logps = _hidden_state_path(model, base, head, model_inputs, rows, cols, targets, chunk_size)
    return token_logps


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT, DDP / accelerate / DeepSpeed and ``torch.compile`` wrappers."""
    while True:
        if callable(getattr(model, "get_base_model", None)):  # PEFT
            inner = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DataParallel, DeepSpeed engine
            inner = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            inner = model._orig_mod
        else:
            return model
        if inner is model:
            return model
        model = inner


@dataclass(frozen=True)
class _LogitHead:
    """The model's LM head as its forward applies it: output embeddings, then scale, then soft-cap."""

    module: nn.Module
    scale: float | None
    softcap: float | None

    @property
    def vocabulary(self) -> int:
        """Rows of the head: the width of its logits."""
        out_features = getattr(self.module, "out_features", None)
        return int(out_features) if out_features is not None else int(self.module.weight.shape[0])

    def __call__(self, hidden: Tensor) -> Tensor:
        # The projection runs in the model's dtype, like the model's own head; everything after it in float32.
        logits = self.module(hidden).float()
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _reproducible_head(base: nn.Module) -> _LogitHead | None:
    """The head to apply to hidden states, or None where the model's full logits must be used."""
    config = getattr(base, "config", None)
    get_output_embeddings = getattr(base, "get_output_embeddings", None)
    get_decoder = getattr(base, "get_decoder", None)
    if config is None or get_output_embeddings is None or get_decoder is None:
        return None
    module = get_output_embeddings()
    if module is None or get_decoder() is base:
        return None
    if "logits_to_keep" not in inspect.signature(type(base).forward).parameters:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config.model_type in FULL_LOGITS_MODEL_TYPES or config.model_type in FULL_LOGITS_MODEL_TYPES:
        return None
    softcap = getattr(text_config, "final_logit_softcapping", None) or getattr(
        text_config, "logits_soft_cap", None
    )
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text_config, name, None) is not None:
            scale = float(getattr(text_config, name))
            break
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = float(text_config.logits_scaling)
        scale = scaling if text_config.model_type == "hyperclovax" else 1.0 / scaling
    return _LogitHead(module=module, scale=scale, softcap=softcap)


def _hidden_state_path(
    model: nn.Module,
    base: nn.Module,
    head: _LogitHead,
    model_inputs: dict[str, Tensor | dict[str, Tensor] | None],
    rows: Tensor,
    cols: Tensor,
    targets: Tensor,
    chunk_size: int | None,
) -> Tensor:
    """Completion-token log-probs (M,) from the decoder's final hidden states, captured inside ``model(...)``."""
    captured: dict[str, Tensor] = {}

    def on_decoder_output(_module: nn.Module, _args: object, output: object) -> None:
        if "token_logps" in captured:
            raise RuntimeError(f"{type(base).__name__} calls its decoder more than once per forward")
        hidden = output[0]  # last_hidden_state of a ModelOutput or a tuple: (N, T, H)
        captured["token_logps"] = _chunked_target_logps(hidden, rows, cols, targets, head, chunk_size)
        if not head.module.training:  # in training mode a LoRA dropout on the head would make them differ
            with torch.no_grad():
                captured["last_logits"] = head(hidden[:, -1])

    handle = base.get_decoder().register_forward_hook(on_decoder_output)
    try:
        outputs = model(**model_inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if "token_logps" not in captured:
        raise RuntimeError(f"the decoder of {type(base).__name__} was not called by its forward")
    if "last_logits" in captured:
        _check_head(base, captured["last_logits"], outputs.logits[:, -1])
    return captured["token_logps"]


_DEFERRED_HEAD_CHECKS: contextvars.ContextVar[list[Tensor] | None] = contextvars.ContextVar(
    "deferred_head_checks", default=None
)


@contextlib.contextmanager
def deferred_head_checks() -> Iterator[list[Tensor]]:
    """Within it, each forward's head check is appended to the yielded list as a (2,) float32 device tensor
    ``(difference, tolerance)`` instead of being read on the host; pass them (stacked, on the host or not) to
    ``raise_if_head_differs``. Nothing syncs with the device until the caller reads them."""
    checks: list[Tensor] = []
    token = _DEFERRED_HEAD_CHECKS.set(checks)
    try:
        yield checks
    finally:
        _DEFERRED_HEAD_CHECKS.reset(token)


def _check_head(base: nn.Module, reproduced: Tensor, actual: Tensor) -> None:
    """Raise if the model's own logits (N, V) differ from the reproduced head's beyond its dtype's rounding (one
    host sync), or hand the comparison to ``deferred_head_checks``."""
    # Tolerance from the dtype the model computed its logits in: a bf16 head rounds the soft-cap in bf16.
    relative = max(1e-4, 8 * torch.finfo(actual.dtype).eps)
    largest = actual.detach().abs().max().float().nan_to_num(nan=1.0, posinf=float("inf"))
    tolerance = relative * largest.clamp(min=1.0)
    difference = (reproduced - actual.detach().float()).abs().nan_to_num(nan=0.0).max()
    check = torch.stack([difference, tolerance])
    deferred = _DEFERRED_HEAD_CHECKS.get()
    if deferred is not None:
        deferred.append(check)
    else:
        raise_if_head_differs(base, check)


def raise_if_head_differs(model: nn.Module, checks: Tensor) -> None:
    """Raise if any head check ``(difference, tolerance)`` of ``checks`` (2,) or (n, 2) exceeds its tolerance."""
    values = checks.reshape(-1, 2).tolist()  # the one host sync
    failed = [(difference, tolerance) for difference, tolerance in values if difference > tolerance]
    if failed:
        difference, tolerance = failed[0]
        base = unwrap_model(model)
        model_type = base.config.model_type
        raise RuntimeError(
            f"{type(base).__name__} transforms its logits in a way mrpo does not reproduce (the last position's "
            f"logits differ by {difference:.3g}, tolerance {tolerance:.3g}). Add {model_type!r} to "
            "mrpo.logprobs.FULL_LOGITS_MODEL_TYPES to score it from its full logits, and please report it."
        )


def _to_float32(logits: Tensor) -> Tensor:
    return logits.float()


def _chunked_target_logps(
    source: Tensor,
    rows: Tensor,
    cols: Tensor,
    targets: Tensor,
    project: Callable[[Tensor], Tensor],
    chunk_size: int | None,
) -> Tensor:
    """log p(target) (M,) float32 for the positions (rows, cols) of ``source`` (N, T, H or V), chunk by chunk.

    ``project`` maps (n, H or V) to float32 logits (n, V). With gradient enabled each chunk is checkpointed: only
    its inputs are kept, and its logits are recomputed in the backward pass. ``chunk_size`` None: sized by the
    vocabulary (``default_chunk_size``).
    """
    if chunk_size is None:
        vocabulary = project.vocabulary if isinstance(project, _LogitHead) else source.shape[-1]
        chunk_size = default_chunk_size(vocabulary)
    pieces = []
    for start in range(0, rows.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        args = (source, rows[chunk], cols[chunk], targets[chunk], project)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_target_logps, *args, use_reentrant=False))
        else:
            pieces.append(_target_logps(*args))
    if not pieces:
        return source.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def _target_logps(
    source: Tensor, rows: Tensor, cols: Tensor, targets: Tensor, project: Callable[[Tensor], Tensor]
) -> Tensor:
    logits = project(source[rows, cols])  # (n, V) float32
    # log_softmax gathered at the target, without a second (n, V) tensor for the full log_softmax.
    target_logits = logits.gather(-1, targets[:, None]).squeeze(-1)
    if torch.is_grad_enabled():
        return target_logits - logits.logsumexp(dim=-1)
    return target_logits - _logsumexp_in_place(logits)


def _logsumexp_in_place(logits: Tensor) -> Tensor:
    """``logits.logsumexp(-1)`` by the same steps as torch's, overwriting ``logits`` (a fresh tensor) with its
    exponentials instead of allocating a second (n, V) tensor: while scoring, the head holds one chunk of logits."""
    largest = logits.amax(dim=-1, keepdim=True)
    largest = largest.masked_fill(largest.abs() == float("inf"), 0.0)
    return logits.sub_(largest).exp_().sum(dim=-1).log_().add_(largest.squeeze(-1))
