"""``mrpo train --dry-run``: the plan of a run from its config, without loading any weights.

The policy is built from its config on PyTorch's meta device (shapes, no memory), LoRA adapters are counted from
its linear layers, and the plan says what a step holds: pairs and tokens per optimizer step, per device and in all,
and an *estimate* of the memory per device. The estimate is arithmetic on the shapes, not a measurement. With ``d``
the bytes per element of the dtype the run will use on the planned device (``policy.dtype: auto`` is float32 on
CPU, bfloat16 on CUDA: ``models.resolve_dtype``), ``T`` the tokens of one micro-batch at its upper bound (every
sequence ``data.max_length`` tokens, or ``policy.micro_batch_tokens``), ``h`` the hidden size, ``kv`` the key/value
width (kv heads x head dim), ``i`` the MLP width, ``L`` the layers and ``V`` the vocabulary:

- weights: every parameter, ``d`` bytes each (divided across the processes under FSDP full sharding);
- training state: per trainable parameter its gradient and AdamW's two moments, in the parameter's dtype: ``d``
  for full fine-tuning, 4 bytes for LoRA adapters (peft keeps them in float32); also sharded under FSDP;
- activations saved for the backward pass, per layer and token, for a Llama-style decoder (gated MLP, attention
  that keeps no score matrix, as sdpa and flash do): ``(11 h + 4 kv + 4 i) x d`` bytes (two RMS norms and their
  inputs ~5 h, the projections' inputs 2 h, q/k before and after the rotary embedding ~2 (h + kv), attention's
  q, k, v and output ~2 h + 2 kv, the MLP's gate, its activation, up and their product 4 i). LoRA adds, per
  adapted linear layer, its input again after the adapter's dropout plus the dropout's mask (``in x (d + 1)``
  when lora.dropout > 0) and the rank-r intermediate (``r x d``). Eager attention adds its scores and softmax,
  ``2 x heads x max_length x d``. The total is ``T x L x`` that, plus ``3 h x d`` per token outside the layers
  (embeddings, final norm). With gradient checkpointing a layer keeps only its input (``h x d`` per token) and one
  layer at a time holds its full activations again in the backward pass;
- the LM head: log-probs are computed ``C = logprobs.default_chunk_size(V)`` positions at a time (about 2^26 / V),
  each chunk's float32 logits, their log-softmax and its gradient: ``3 x min(T, C) x V x 4`` bytes.

Measured against the tensors a training forward saves, the activation formula is 5-8% over per layer at
SmolLM2-135M's shapes (with and without LoRA) and 20-25% over at the test suite's tiny ones (tests/test_plan.py);
for SmolLM2-135M with LoRA on CPU at 4 pairs of 384 tokens the plan says 7.9 GiB (8.5 GB) where the run peaked at
8.6 GB. Real peaks differ (allocator fragmentation, kernels' workspaces, other MLP shapes): treat the figure as a
guide to plan by, and measure the first steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mrpo.config.schema import MRPOConfig
from mrpo.fast_path import choose_fast_path
from mrpo.logprobs import default_chunk_size


@dataclass
class TrainPlan:
    policy: str
    parameters: int
    trainable: int
    dtype: str
    device: str
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
    intermediate: int = 0
    """MLP width (``intermediate_size``)."""
    kv_width: int = 0
    """Key/value width: kv heads x head dim."""
    heads: int = 0
    vocabulary: int = 0
    eager_attention: bool = False
    lora: bool = False
    lora_inputs_per_layer: float = 0.0
    """Sum of the input widths of the LoRA-adapted linear layers, per decoder layer."""
    lora_rank_per_layer: float = 0.0
    """r x the number of adapted linear layers, per decoder layer."""
    lora_dropout: bool = False
    fast_path: str = ""
    """What ``fast_path.choose_fast_path`` chose for this device (rows, compilation, bucket) and why."""

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

    @property
    def element_bytes(self) -> int:
        return torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()

    def layer_bytes_per_token(self) -> float:
        """Bytes one decoder layer saves for the backward pass per token (the formula of the module docstring)."""
        d, h = self.element_bytes, self.hidden
        elements = 11 * h + 4 * self.kv_width + 4 * self.intermediate
        if self.eager_attention:
            elements += 2 * self.heads * self.max_length
        adapters = self.lora_rank_per_layer * d
        if self.lora_dropout:
            adapters += self.lora_inputs_per_layer * (d + 1)
        return elements * d + adapters

    def activation_bytes(self) -> float:
        """Activations of one micro-batch saved for the backward pass, LM head excluded."""
        tokens, d = self.tokens_per_forward, self.element_bytes
        per_layer = self.layer_bytes_per_token()
        layers = self.hidden * d * self.layers + per_layer if self.checkpointing else per_layer * self.layers
        return tokens * (layers + 3 * self.hidden * d)

    def memory_gib(self) -> dict[str, float]:
        """The estimate per device, in GiB, by part."""
        shards = self.processes if self.fsdp else 1
        state_bytes = 4 if self.lora else self.element_bytes
        parts = {
            "weights": self.parameters * self.element_bytes / shards,
            "gradients + optimizer": 3
            * self.trainable
            * state_bytes
            / shards,  # gradient + two AdamW moments
            "activations (one micro-batch)": self.activation_bytes(),
            "LM head logits": 3
            * min(self.tokens_per_forward, default_chunk_size(self.vocabulary))
            * self.vocabulary
            * 4,
        }
        gib = {name: value / 2**30 for name, value in parts.items()}
        gib["total"] = sum(gib.values())
        return gib

    def text(self) -> str:
        memory = self.memory_gib()
        lines = [
            f"policy          {self.policy}: {self.parameters / 1e9:.2f}B parameters in {self.dtype} on "
            f"{self.device}, "
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
            *([self.fast_path] if self.fast_path else []),
        ]
        return "\n".join(lines)


def plan_training(
    config: MRPOConfig, *, processes: int = 1, fsdp: bool = False, cuda: bool | None = None
) -> TrainPlan:
    """The plan of ``config`` for ``processes`` devices, from the policy's config alone (meta device).

    ``cuda``: whether the run trains on CUDA devices; by default, whether this machine has one and
    ``training.use_cpu`` is not set (it decides the dtype "auto" stands for)."""
    from transformers import AutoModelForCausalLM

    from mrpo.models import load_model_config, resolve_dtype

    training = config.training.to_dict()
    if cuda is None:
        cuda = torch.cuda.is_available() and not training.get("use_cpu")
    model_config = load_model_config(config.policy.model, role="policy")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    parameters = sum(p.numel() for p in skeleton.parameters())
    text_config = getattr(model_config, "text_config", None) or model_config
    layers = int(getattr(text_config, "num_hidden_layers", 0))
    heads = int(getattr(text_config, "num_attention_heads", 0))
    hidden = int(getattr(text_config, "hidden_size", 0))
    head_dim = int(getattr(text_config, "head_dim", None) or (hidden // heads if heads else 0))
    lora = _lora_shapes(config, skeleton, layers) if config.lora.enabled else (parameters, 0.0, 0.0)
    checkpointing = bool(training.get("gradient_checkpointing") or training.get("activation_checkpointing"))
    return TrainPlan(
        policy=config.policy.model,
        parameters=parameters,
        trainable=lora[0],
        dtype=resolve_dtype(config.policy.dtype, cuda=cuda),
        device="cuda" if cuda else "cpu",
        layers=layers,
        hidden=hidden,
        processes=processes,
        fsdp=fsdp,
        per_device_pairs=int(training.get("per_device_train_batch_size", 8)),
        accumulation=int(training.get("gradient_accumulation_steps", 1)),
        max_length=config.data.max_length,
        micro_batch_tokens=config.policy.micro_batch_tokens,
        checkpointing=checkpointing,
        references=len(config.references or []),
        intermediate=int(getattr(text_config, "intermediate_size", None) or 4 * hidden),
        kv_width=int(getattr(text_config, "num_key_value_heads", None) or heads) * head_dim,
        heads=heads,
        vocabulary=int(getattr(text_config, "vocab_size", 0)),
        eager_attention=config.policy.attn_implementation == "eager",
        lora=config.lora.enabled,
        lora_inputs_per_layer=lora[1],
        lora_rank_per_layer=lora[2],
        lora_dropout=config.lora.dropout > 0,
        fast_path=choose_fast_path(config.policy, cuda=cuda).text(),
    )


def _lora_shapes(config: MRPOConfig, skeleton: torch.nn.Module, layers: int) -> tuple[int, float, float]:
    """The LoRA adapters the config puts on the model: their parameters (r x (in + out) per adapted linear
    layer), and per decoder layer the sum of the adapted layers' input widths and of their ranks."""
    from mrpo.models import add_lora

    adapted = add_lora(skeleton, config.lora)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    modules = [
        module for module in adapted.modules() if hasattr(module, "lora_A") and hasattr(module, "in_features")
    ]
    per_layer = max(layers, 1)
    inputs = sum(module.in_features for module in modules) / per_layer
    return trainable, inputs, config.lora.r * len(modules) / per_layer
