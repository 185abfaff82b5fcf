"""The MRPO loss and its building blocks: pure tensor maths of docs/method.md (torch only).

Naming grid, used everywhere: ``policy_/reference_ x chosen_/rejected_ x logps``. Policy tensors are ``(B,)``;
reference tensors are ``(K, B)`` with row 0 the *initialising* reference (the model the policy starts from) and
rows 1.. the *external* references. Every log-prob is a sequence log-probability: the sum over the completion's
tokens, computed by each model on its own tokenization of the same text.

The file follows docs/method.md section by section:

- §1 ``reference_weights``       -- alpha, adaptive (ARWC) or fixed;
- §2 ``trust_region_eps``        -- the CTRO band half-width per pair and response;
  §2 ``clip_to_trust_region``    -- clamp external references into the band around the initialising one;
- §2b ``align_levels``           -- optional per-pair level shift of the external references;
- §3 ``virtual_reference_logps`` -- weighted harmonic (or geometric) mean of the references;
- §4 ``mrpo_loss``               -- the loss (MRPO, MDPO, and DPO when K = 1), with §5's statistics;
- §7 ``per_token``               -- optional length normalisation of every log-prob before §1-§4.

All combination happens in float32 or wider (§6); nothing reference-side carries a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Weights = Literal["adaptive"] | Sequence[float]
Clip = Literal["adaptive", "fixed", "off"]
Aggregation = Literal["harmonic", "geometric", "mdpo"]
Align = Literal["none", "pair"]

WEIGHT_FLOOR = 1e-6
"""Added to every |d_k| in ARWC so that a pair no reference separates gets uniform weights (method.md §1)."""


# --------------------------------------------------------------------------------------------------------------
# §1. Reference weights (ARWC)
# --------------------------------------------------------------------------------------------------------------


def reference_weights(
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    weights: Weights = "adaptive",
) -> torch.Tensor:
    """Weight of each reference for each pair, ``alpha``: shape ``(K, B)``, columns sum to 1.

    Args:
        reference_chosen_logps: ``(K, B)`` unclipped reference log-probs of the chosen responses.
        reference_rejected_logps: ``(K, B)`` unclipped reference log-probs of the rejected responses.
        weights: ``"adaptive"`` -- alpha_k = (|d_k| + 1e-6) / sum_j (|d_j| + 1e-6) with d_k = l_k(y_w) - l_k(y_l),
            each reference weighted by its own confidence on the pair; or K non-negative numbers, normalised
            to sum 1 and shared by every pair.
    """
    num_references, batch_size = reference_chosen_logps.shape
    if isinstance(weights, str):
        if weights != "adaptive":
            raise ValueError(
                f"weights must be 'adaptive' or a sequence of {num_references} numbers, got {weights!r}"
            )
        confidence = (reference_chosen_logps - reference_rejected_logps).abs() + WEIGHT_FLOOR  # |d_k| + 1e-6
        return (confidence / confidence.sum(dim=0, keepdim=True)).detach()
    fixed = _fixed_weights(weights, num_references)
    return fixed.to(reference_chosen_logps).unsqueeze(1).expand(num_references, batch_size)


def _fixed_weights(weights: Sequence[float], num_references: int) -> torch.Tensor:
    values = [float(w) for w in weights]
    if len(values) != num_references:
        raise ValueError(f"weights has {len(values)} entries but there are K={num_references} references")
    bad = [w for w in values if not (w >= 0.0 and w != float("inf"))]  # also catches NaN
    if bad:
        raise ValueError(f"weights must be finite and non-negative, got {values}")
    total = sum(values)
    if total <= 0.0:
        raise ValueError(f"weights must not all be zero, got {values}")
    return torch.tensor([w / total for w in values], dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------
# §2. Clipped trust region (CTRO)
# --------------------------------------------------------------------------------------------------------------


def trust_region_eps(
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    clip: Clip = "adaptive",
    eps: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative half-width of the trust region for the chosen and the rejected response: two ``(B,)`` tensors.

    Adaptive: with b_y = mean_k l_k(y) (over all K references, before clipping),
    eps_w = eps * |b_w| / (|b_w| + |b_l|) and eps_l = eps * |b_l| / (|b_w| + |b_l|), so eps_w + eps_l = eps;
    both are eps / 2 when |b_w| + |b_l| = 0. The response the references find less likely gets the wider band.
    This uses which response is the chosen one, so metrics against the resulting reference see the label.
    Fixed: eps for both. Off: zeros (and ``clip_to_trust_region`` is not applied).
    """
    batch_size = reference_chosen_logps.shape[1]
    if clip == "off":
        zeros = reference_chosen_logps.new_zeros(batch_size)
        return zeros, zeros
    if clip == "fixed":
        fixed = reference_chosen_logps.new_full((batch_size,), float(eps))
        return fixed, fixed
    if clip != "adaptive":
        raise ValueError(f"clip must be 'adaptive', 'fixed' or 'off', got {clip!r}")
    chosen_level = reference_chosen_logps.mean(dim=0).abs()  # |b_w|
    rejected_level = reference_rejected_logps.mean(dim=0).abs()  # |b_l|
    total = chosen_level + rejected_level
    degenerate = total == 0
    safe_total = torch.where(degenerate, torch.ones_like(total), total)
    half = torch.full_like(total, 0.5)
    eps_chosen = eps * torch.where(degenerate, half, chosen_level / safe_total)
    eps_rejected = eps * torch.where(degenerate, half, rejected_level / safe_total)
    return eps_chosen.detach(), eps_rejected.detach()


def clip_to_trust_region(
    reference_logps: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp external references into ``[(1 + eps) l_1, (1 - eps) l_1]`` around the initialising one (method.md §2).

    Args:
        reference_logps: ``(K, B)`` log-probs of one response (chosen or rejected), row 0 the initialising one.
        eps: ``(B,)`` half-width for that response.

    Returns:
        The clipped ``(K, B)`` log-probs (row 0 unchanged) and a ``(K, B)`` boolean mask of the values the clamp
        moved (row 0 always False).
    """
    initialising = reference_logps[0]
    # For log-probs (<= 0) (1 + eps) l_1 is the lower end. Taking min/max keeps the band well-formed even for a
    # (meaningless) positive l_1 instead of letting clamp() silently collapse it.
    lower = torch.minimum((1 + eps) * initialising, (1 - eps) * initialising)
    upper = torch.maximum((1 + eps) * initialising, (1 - eps) * initialising)
    external = reference_logps[1:]
    clipped_external = torch.maximum(torch.minimum(external, upper), lower)
    clipped = torch.cat([reference_logps[:1], clipped_external], dim=0)
    moved = torch.cat([torch.zeros_like(reference_logps[:1], dtype=torch.bool), clipped_external != external])
    return clipped, moved


def align_levels(
    reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor, align: Align = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each external reference so its mean over the pair's two responses equals the initialising one's.

    method.md §2b (a research variant, not in the paper): s_k = ((l_1(y_w) + l_1(y_l)) - (l_k(y_w) + l_k(y_l))) / 2,
    l_k(y) <- l_k(y) + s_k for k >= 2. The margin d_k, and so alpha, is unchanged; the shift only removes the
    systematic level difference between model families that otherwise makes CTRO clip nearly everything.
    """
    if align == "none":
        return reference_chosen_logps, reference_rejected_logps
    if align != "pair":
        raise ValueError(f"align must be 'none' or 'pair', got {align!r}")
    pair_level = reference_chosen_logps + reference_rejected_logps  # (K, B)
    shift = (pair_level[:1] - pair_level) / 2  # row 0 gets shift 0
    return reference_chosen_logps + shift, reference_rejected_logps + shift


# --------------------------------------------------------------------------------------------------------------
# §3. The virtual reference
# --------------------------------------------------------------------------------------------------------------


def virtual_reference_logps(
    reference_logps: torch.Tensor,
    alpha: torch.Tensor,
    aggregation: Literal["harmonic", "geometric"] = "harmonic",
) -> torch.Tensor:
    """Log-probability of the virtual reference r for one response: shape ``(B,)``.

    Args:
        reference_logps: ``(K, B)`` (clipped) reference log-probs l'_k(y).
        alpha: ``(K, B)`` weights, columns summing to 1.
        aggregation: ``"harmonic"`` -- log r = -logsumexp_k(log alpha_k - l'_k), the weighted harmonic mean of
            the reference probabilities (the paper's); a reference with alpha_k = 0 drops out.
            ``"geometric"`` -- log r = sum_k alpha_k l'_k (Aminian et al., arXiv 2502.01203).
    """
    if aggregation == "harmonic":
        return -torch.logsumexp(torch.log(alpha) - reference_logps, dim=0)
    if aggregation == "geometric":
        return (alpha * reference_logps).sum(dim=0)
    raise ValueError(f"aggregation must be 'harmonic' or 'geometric' here, got {aggregation!r}")


# --------------------------------------------------------------------------------------------------------------
# §4. The loss, and §5's statistics
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MRPOOutput:
    """Everything one evaluation of the loss produced. Per-pair tensors are ``(B,)``, per-reference ``(K, B)``."""

    losses: torch.Tensor
    """(B,) per-pair loss, with gradient w.r.t. the policy log-probs."""
    loss: torch.Tensor
    """Scalar mean of ``losses``."""
    chosen_rewards: torch.Tensor
    """(B,) detached beta * (policy_chosen_logps - log r(y_w))."""
    rejected_rewards: torch.Tensor
    """(B,) detached beta * (policy_rejected_logps - log r(y_l))."""
    policy_chosen_logps: torch.Tensor
    """(B,) detached policy log-probs, float32 or wider."""
    policy_rejected_logps: torch.Tensor
    virtual_chosen_logps: torch.Tensor
    """(B,) log r(y_w): the virtual reference the rewards are measured against."""
    virtual_rejected_logps: torch.Tensor
    alpha: torch.Tensor
    """(K, B) reference weights; column b sums to 1."""
    eps_chosen: torch.Tensor
    """(B,) CTRO half-width used for the chosen response (zeros when clipping is off)."""
    eps_rejected: torch.Tensor
    reference_margins: torch.Tensor
    """(K, B) d_k = l_k(y_w) - l_k(y_l), unclipped: how each reference separates the pair."""
    clipped_chosen: torch.Tensor
    """(K, B) bool: which reference log-probs of the chosen response CTRO moved (row 0 always False)."""
    clipped_rejected: torch.Tensor

    @property
    def num_references(self) -> int:
        return self.alpha.shape[0]

    @property
    def clip_rate(self) -> torch.Tensor:
        """(B,) share of this pair's external-reference log-probs that CTRO moved (0 when K = 1)."""
        if self.num_references == 1:
            return torch.zeros_like(self.eps_chosen)
        dtype = self.eps_chosen.dtype
        moved = self.clipped_chosen[1:].to(dtype).sum(0) + self.clipped_rejected[1:].to(dtype).sum(0)
        return moved / (2 * (self.num_references - 1))

    def pair_statistics(self) -> dict[str, torch.Tensor]:
        """The quantities of method.md §5 as detached ``(B,)`` tensors; their mean over pairs is the logged value.

        Per-pair values (rather than batch means) let a trainer gather them across processes and accumulation
        steps and average exactly. Names follow TRL where the concept matches, so dashboards carry over.
        """
        dtype = self.chosen_rewards.dtype
        stats = {
            "rewards/chosen": self.chosen_rewards,
            "rewards/rejected": self.rejected_rewards,
            "rewards/margins": self.chosen_rewards - self.rejected_rewards,
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).to(dtype),
            "logps/chosen": self.policy_chosen_logps,
            "logps/rejected": self.policy_rejected_logps,
        }
        for k in range(self.num_references):
            stats[f"ref{k + 1}/margin"] = self.reference_margins[k]
            stats[f"ref{k + 1}/accuracy"] = (self.reference_margins[k] > 0).to(dtype)
            stats[f"alpha/ref{k + 1}"] = self.alpha[k]
        stats["ctro/eps_chosen"] = self.eps_chosen
        stats["ctro/eps_rejected"] = self.eps_rejected
        stats["ctro/clip_rate"] = self.clip_rate
        return {name: value.detach() for name, value in stats.items()}


def mrpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    weights: Weights = "adaptive",
    clip: Clip = "adaptive",
    eps: float = 0.1,
    aggregation: Aggregation = "harmonic",
    align: Align = "none",
    length_normalize: bool = False,
    check_finite: bool = True,
    *,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> MRPOOutput:
    """Multi-Reference Preference Optimization loss (method.md §4); DPO's sigmoid loss when K = 1.

    Args:
        policy_chosen_logps: ``(B,)`` policy log-probs of the chosen responses (with gradient).
        policy_rejected_logps: ``(B,)`` policy log-probs of the rejected responses.
        reference_chosen_logps: ``(K, B)`` reference log-probs of the chosen responses; row 0 = initialising.
        reference_rejected_logps: ``(K, B)`` reference log-probs of the rejected responses.
        beta: the KL strength, > 0.
        weights: ``"adaptive"`` (ARWC, §1) or K fixed non-negative weights (normalised to sum 1).
        clip: CTRO (§2): ``"adaptive"`` (eps is eps_max, split between the two responses), ``"fixed"``, ``"off"``.
        eps: eps_max when adaptive, the half-width when fixed, ignored when off; >= 0.
        aggregation: ``"harmonic"`` (§3, the paper's), ``"geometric"``, or ``"mdpo"`` (alpha-weighted sum of K
            DPO losses; its rewards are measured against the alpha-weighted geometric reference).
        align: ``"none"`` or ``"pair"`` (§2b level alignment before CTRO).
        length_normalize: §7: divide every log-prob, the policy's and each reference's, by the response's length
            in the policy's tokens (``chosen_tokens`` / ``rejected_tokens``, required then) before §1-§4; the
            returned log-probs and rewards are then per token.
        check_finite: raise on NaN/inf or positive inputs (one host sync); turn off only where inputs are known
            valid or checked elsewhere (``valid_logps`` then ``check_logps``, as the trainer does once a step).
    """
    _check_inputs(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
        eps,
    )
    if aggregation not in ("harmonic", "geometric", "mdpo"):
        raise ValueError(f"aggregation must be 'harmonic', 'geometric' or 'mdpo', got {aggregation!r}")
    # §6: combine in float32 or wider whatever the input dtype (bf16 log-probs of long sequences lose whole nats).
    dtype = torch.promote_types(
        torch.promote_types(policy_chosen_logps.dtype, reference_chosen_logps.dtype), torch.float32
    )
    policy_chosen = policy_chosen_logps.to(dtype)
    policy_rejected = policy_rejected_logps.to(dtype)
    reference_chosen = reference_chosen_logps.detach().to(dtype=dtype, device=policy_chosen.device)
    reference_rejected = reference_rejected_logps.detach().to(dtype=dtype, device=policy_chosen.device)
    if check_finite:
        check_logps(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    if length_normalize:  # §7
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(
                "length_normalize needs chosen_tokens and rejected_tokens: (B,) policy token counts"
            )
        policy_chosen, reference_chosen = per_token(
            policy_chosen, reference_chosen, chosen_tokens, check_finite
        )
        policy_rejected, reference_rejected = per_token(
            policy_rejected, reference_rejected, rejected_tokens, check_finite
        )

    alpha = reference_weights(reference_chosen, reference_rejected, weights)  # §1, on unclipped log-probs
    aligned_chosen, aligned_rejected = align_levels(reference_chosen, reference_rejected, align)  # §2b
    eps_chosen, eps_rejected = trust_region_eps(aligned_chosen, aligned_rejected, clip, eps)  # §2
    if clip == "off":
        clipped_chosen, clipped_rejected = aligned_chosen, aligned_rejected
        moved_chosen = moved_rejected = torch.zeros_like(aligned_chosen, dtype=torch.bool)
    else:
        clipped_chosen, moved_chosen = clip_to_trust_region(aligned_chosen, eps_chosen)
        clipped_rejected, moved_rejected = clip_to_trust_region(aligned_rejected, eps_rejected)

    policy_margin = policy_chosen - policy_rejected  # log pi(y_w|x) - log pi(y_l|x)
    if aggregation == "mdpo":
        # Baseline multi-DPO: sum_k alpha_k * softplus(-beta * (policy margin - reference k's clipped margin)).
        per_reference_z = beta * (policy_margin.unsqueeze(0) - (clipped_chosen - clipped_rejected))
        losses = (alpha * F.softplus(-per_reference_z)).sum(dim=0)
        virtual_chosen = virtual_reference_logps(clipped_chosen, alpha, "geometric")
        virtual_rejected = virtual_reference_logps(clipped_rejected, alpha, "geometric")
    else:
        virtual_chosen = virtual_reference_logps(clipped_chosen, alpha, aggregation)  # log r(y_w), §3
        virtual_rejected = virtual_reference_logps(clipped_rejected, alpha, aggregation)  # log r(y_l)
        z = beta * (policy_margin - (virtual_chosen - virtual_rejected))  # §4
        losses = F.softplus(-z)  # = -log sigmoid(z), stable for any z

    return MRPOOutput(
        losses=losses,
        loss=losses.mean(),
        chosen_rewards=(beta * (policy_chosen - virtual_chosen)).detach(),
        rejected_rewards=(beta * (policy_rejected - virtual_rejected)).detach(),
        policy_chosen_logps=policy_chosen.detach(),
        policy_rejected_logps=policy_rejected.detach(),
        virtual_chosen_logps=virtual_chosen.detach(),
        virtual_rejected_logps=virtual_rejected.detach(),
        alpha=alpha,
        eps_chosen=eps_chosen,
        eps_rejected=eps_rejected,
        reference_margins=reference_chosen - reference_rejected,
        clipped_chosen=moved_chosen,
        clipped_rejected=moved_rejected,
    )


def per_token(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, tokens: torch.Tensor, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """§7: the ``(B,)`` policy and ``(K, B)`` reference log-probs of one response each divided by its length in the
    policy's tokens, ``(B,)``: one divisor per response, shared by every model, so the harmonic and geometric means
    and CTRO's relative band commute with it, while a margin no longer grows with the answers' length difference.
    ``check``: refuse a count below 1 (one host sync; the collator's counts are >= 1 by construction)."""
    if tokens.shape != policy_logps.shape:
        raise ValueError(
            f"token counts must have shape {tuple(policy_logps.shape)}, got {tuple(tokens.shape)}"
        )
    if check and bool((tokens < 1).any()):
        raise ValueError(
            "length_normalize: every response needs at least one completion token (a count was < 1)"
        )
    divisor = tokens.to(device=policy_logps.device, dtype=policy_logps.dtype)
    return policy_logps / divisor, reference_logps / divisor


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> MRPOOutput:
    """DPO's sigmoid loss: MRPO with the single reference given as ``(B,)`` tensors (K = 1)."""
    return mrpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps.unsqueeze(0),
        reference_rejected_logps.unsqueeze(0),
        beta=beta,
        clip="off",
    )


# --------------------------------------------------------------------------------------------------------------
# Input checks (§6): a clear ValueError, never a silent NaN
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    eps: float,
) -> None:
    if not (isinstance(beta, (int, float)) and beta > 0 and beta != float("inf")):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps != float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    for name, tensor in (
        ("policy_chosen_logps", policy_chosen_logps),
        ("policy_rejected_logps", policy_rejected_logps),
    ):
        if tensor.dim() != 1:
            raise ValueError(f"{name} must have shape (B,), got {tuple(tensor.shape)}")
    if policy_chosen_logps.dim() == 1 and policy_chosen_logps.shape[0] == 0:
        raise ValueError(
            "the batch is empty (B = 0): the loss is a mean over pairs and needs at least one pair"
        )
    if policy_chosen_logps.shape != policy_rejected_logps.shape:
        raise ValueError(
            f"policy_chosen_logps {tuple(policy_chosen_logps.shape)} and policy_rejected_logps "
            f"{tuple(policy_rejected_logps.shape)} must have the same shape (B,)"
        )
    batch_size = policy_chosen_logps.shape[0]
    for name, tensor in (
        ("reference_chosen_logps", reference_chosen_logps),
        ("reference_rejected_logps", reference_rejected_logps),
    ):
        if tensor.dim() != 2 or tensor.shape[1] != batch_size:
            raise ValueError(f"{name} must have shape (K, B) = (K, {batch_size}), got {tuple(tensor.shape)}")
        if tensor.shape[0] == 0:
            raise ValueError(
                f"{name} has K = 0 references; at least one (the initialising reference) is needed"
            )
    if reference_chosen_logps.shape != reference_rejected_logps.shape:
        raise ValueError(
            f"reference_chosen_logps {tuple(reference_chosen_logps.shape)} and reference_rejected_logps "
            f"{tuple(reference_rejected_logps.shape)} must have the same shape (K, B)"
        )
    for tensor in (
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
    ):
        if not tensor.is_floating_point():
            raise ValueError(f"log-probs must be floating point tensors, got dtype {tensor.dtype}")


class NonFiniteLogpsError(ValueError):
    """A log-prob given to the loss is NaN or infinite; ``pair`` is its index in the batch, ``reference`` the row."""

    def __init__(self, message: str, *, tensor: str, pair: int, reference: int | None = None):
        super().__init__(message)
        self.tensor = tensor
        self.pair = pair
        self.reference = reference


def valid_logps(*logps: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on the inputs' device: every log-prob finite and <= 0 (a sequence log-prob is a sum of
    log-probabilities). No host sync: a caller can combine many and read them once, then ``check_logps`` the
    inputs to name the first bad pair."""
    return torch.stack([(torch.isfinite(t) & (t <= 0)).all() for t in logps]).all()


def check_logps(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
) -> None:
    """Raise ``NonFiniteLogpsError`` naming the first pair (and reference) with a NaN/inf log-prob, or ValueError
    for a positive one; policy ``(B,)``, references ``(K, B)``. One host sync when they are valid."""
    tensors = (policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    if bool(valid_logps(*tensors)):
        return
    for name, tensor in (("policy_chosen_logps", policy_chosen), ("policy_rejected_logps", policy_rejected)):
        bad = (~torch.isfinite(tensor)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteLogpsError(
                f"{name} is not finite for pair {bad[0]} (value {tensor[bad[0]].item()}); "
                f"{len(bad)} pair(s) affected: {bad[:10]}",
                tensor=name,
                pair=bad[0],
            )
    for name, tensor in (
        ("reference_chosen_logps", reference_chosen),
        ("reference_rejected_logps", reference_rejected),
    ):
        bad = (~torch.isfinite(tensor)).nonzero().tolist()
        if bad:
            k, b = bad[0]
            role = "the initialising reference" if k == 0 else "an external reference"
            raise NonFiniteLogpsError(
                f"{name} is not finite for reference {k + 1} ({role}, row {k}) at pair {b} "
                f"(value {tensor[k, b].item()}); {len(bad)} value(s) affected",
                tensor=name,
                pair=b,
                reference=k,
            )
    for name, tensor in zip(
        (
            "policy_chosen_logps",
            "policy_rejected_logps",
            "reference_chosen_logps",
            "reference_rejected_logps",
        ),
        tensors,
        strict=True,
    ):
        positive = (tensor > 0).nonzero().tolist()
        if positive:
            where = positive[0]
            raise ValueError(
                f"{name} has a positive value {tensor[tuple(where)].item()} at index {tuple(where)} "
                f"({len(positive)} in all): sequence log-probs are sums of log-probabilities, <= 0. Pass log-probs, "
                "not probabilities, losses or negated log-probs."
            )
