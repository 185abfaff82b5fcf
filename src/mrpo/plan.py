"""``mrpo train --dry-run``: the plan of a run from its config, without loading any weights.

The policy is built from its config on PyTorch's meta device (shapes, no memory), LoRA adapters are counted from
its linear layers, and the plan says what a step holds: pairs and tokens per optimizer step, per device and in all,
and an *estimate* of the memory per device. The estimate is arithmetic on the shapes, not a measurement:

- weights: every parameter in the policy's dtype (divided across the processes under FSDP full sharding);
- training state: per trainable parameter its gradient and AdamW's two moments, in the parameter's dtype
  (PyTorch keeps optimizer state in the parameter dtype), also sharded under FSDP;
- activations of one micro-batch at its upper bound (every sequence ``data.max_length`` tokens, or
  ``policy.micro_batch_tokens``): ``34 x tokens x hidden x layers`` bytes in 16-bit without checkpointing (the
  per-layer figure of Korthikanti et al., arXiv 2205.05198, for attention that keeps no score matrix), with
  gradient checkpointing ``2 x tokens x hidden`` per layer plus one layer's ``34 x tokens x hidden``.

Real peaks differ (allocator fragmentation, the chunked LM head, kernels' workspaces): treat the figure as a
floor to plan by, and measure the first steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mrpo.config import MRPOConfig, resolve_dtype

ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER = 34
"""Bytes of saved activations per token, hidden unit and layer in 16-bit training (Korthikanti et al.)."""


@dataclass
class TrainPlan:
    policy: str
    parameters: int
    trainable: int
    dtype: str
    layers: int
    hidden: int
    processes: int
    fsdp: bool
    per_device_pairs: int
    accumulation: int
    max_length: int
    micro_batch_tokens: int | None
    checkpointing: bool
    references: int

    @property
    def pairs_per_step(self) -> int:
        return self.per_device_pairs * self.accumulation * self.processes

    @property
    def tokens_per_forward(self) -> int:
        """Upper bound of the tokens one forward processes on one device (both answers of every pair)."""
        full = 2 * self.per_device_pairs * self.max_length
        return min(full, self.micro_batch_tokens) if self.micro_batch_tokens else full

    @property
    def tokens_per_step(self) -> int:
        return 2 * self.pairs_per_step * self.max_length

    def memory_gib(self) -> dict[str, float]:
        """The estimate per device, in GiB, by part."""
        element = torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()
        shards = self.processes if self.fsdp else 1
        weights = self.parameters * element / shards
        state = 3 * self.trainable * element / shards  # gradient + two AdamW moments
        tokens, per_layer = self.tokens_per_forward, self.hidden * ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER
        if self.checkpointing:
            activations = tokens * (2 * self.hidden * self.layers + per_layer)
        else:
            activations = tokens * per_layer * self.layers
        parts = {
            "weights": weights,
            "gradients + optimizer": state,
            "activations (one micro-batch)": activations,
        }
        gib = {name: value / 2**30 for name, value in parts.items()}
        gib["total"] = sum(gib.values())
        return gib

    def text(self) -> str:
        memory = self.memory_gib()
        lines = [
            f"policy          {self.policy}: {self.parameters / 1e9:.2f}B parameters in {self.dtype}, "
            f"{self.trainable / 1e6:.1f}M trainable ({self.layers} layers, hidden {self.hidden})",
            f"references      {self.references} (precomputed once; none is in memory while training)",
            f"processes       {self.processes}"
            + (" with FSDP full sharding" if self.fsdp else " (data parallel)"),
            f"per step        {self.per_device_pairs} pairs per device x {self.accumulation} accumulation x "
            f"{self.processes} processes = {self.pairs_per_step} pairs, at most {self.tokens_per_step:,} tokens "
            f"(max_length {self.max_length})",
            f"one forward     at most {self.tokens_per_forward:,} tokens per device"
            + (", gradient checkpointing" if self.checkpointing else ""),
            "memory per device (estimate, see mrpo.plan): "
            + ", ".join(f"{name} {value:.1f} GiB" for name, value in memory.items()),
        ]
        return "\n".join(lines)


def plan_training(config: MRPOConfig, *, processes: int = 1, fsdp: bool = False) -> TrainPlan:
    """The plan of ``config`` for ``processes`` devices, from the policy's config alone (meta device)."""
    from transformers import AutoModelForCausalLM

    from mrpo.models import load_model_config

    model_config = load_model_config(config.policy.model, role="policy")
    dtype = resolve_dtype(config.policy.dtype, cuda=True)  # the plan is for the GPUs the run will use
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    parameters = sum(p.numel() for p in skeleton.parameters())
    trainable = _lora_parameters(config, skeleton) if config.lora.enabled else parameters
    text_config = getattr(model_config, "text_config", None) or model_config
    training = config.training.to_dict()
    checkpointing = bool(training.get("gradient_checkpointing") or training.get("activation_checkpointing"))
    return TrainPlan(
        policy=config.policy.model,
        parameters=parameters,
        trainable=trainable,
        dtype=dtype,
        layers=int(getattr(text_config, "num_hidden_layers", 0)),
        hidden=int(getattr(text_config, "hidden_size", 0)),
        processes=processes,
        fsdp=fsdp,
        per_device_pairs=int(training.get("per_device_train_batch_size", 8)),
        accumulation=int(training.get("gradient_accumulation_steps", 1)),
        max_length=config.data.max_length,
        micro_batch_tokens=config.policy.micro_batch_tokens,
        checkpointing=checkpointing,
        references=len(config.references or []),
    )


def _lora_parameters(config: MRPOConfig, skeleton: torch.nn.Module) -> int:
    """Parameters of the LoRA adapters the config puts on the model: r x (in + out) per targeted linear layer."""
    from mrpo.models import add_lora

    adapted = add_lora(skeleton, config.lora)
    return sum(p.numel() for p in adapted.parameters() if p.requires_grad)
