"""The one way to load a model, a tokenizer or a model's config: hub id, local directory or ``.gguf`` file.

Every load goes through ``_loading``, so a path that does not load is one ``ModelSourceError`` naming the role
(policy, references.N (name)) and the path, never a transformers traceback. Also the policy as training builds it
(LoRA adapters, compiled layers) and the models ``mrpo evaluate`` scores (the start, an adapter, a full model), and
the rules a load applies: the default device (``default_device``), the dtype "auto" stands for (``resolve_dtype``)
and the LoRA targets checked against the model's linear layers (``check_lora_targets``).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from mrpo.config.schema import Dtype, LoraConfig, MRPOConfig, PolicyConfig
from mrpo.config.typecheck import did_you_mean
from mrpo.errors import ConfigError, ModelSourceError

logger = logging.getLogger(__name__)


def split_gguf(path: str) -> tuple[str, dict[str, str]]:
    """(directory or id, extra from_pretrained arguments): a ``.gguf`` file is read from its directory."""
    if path.endswith(".gguf"):
        gguf = Path(path)
        return str(gguf.parent), {"gguf_file": gguf.name}
    return path, {}


@contextlib.contextmanager
def _loading(kind: str, source: str, role: str | None) -> Iterator[None]:
    """Turn transformers' failure to load ``source`` into one ModelSourceError naming the role and the path."""
    try:
        yield
    except pickle.UnpicklingError as error:
        raise ModelSourceError(_refused_pickle(kind, source, role, error)) from error
    except (OSError, ValueError) as error:
        where = (
            "is not a local directory or .gguf file"
            if not Path(source).exists()
            else "exists but does not load"
        )
        prefix = f"{role}: " if role else ""
        raise ModelSourceError(
            f"{prefix}cannot load the {kind} {source!r}: it {where}, and transformers says: "
            f"{str(error).splitlines()[0]} Point the config at a local model directory, a .gguf file, or a hub id "
            "(reachable unless HF_HUB_OFFLINE=1)."
        ) from error


_PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refused_pickle(kind: str, source: str, role: str | None, error: Exception) -> str:
    """One line for weights torch refuses to unpickle (``weights_only``): which file, what it holds, what to do."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(p for p in path.glob("*") if p.suffix in _PICKLED_SUFFIXES)
    named = ", ".join(str(file) for file in files) or source
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    what = f"the object {found.group(1)}" if found else "an object that is not plain tensors"
    prefix = f"{role}: " if role else ""
    return (
        f"{prefix}cannot load the {kind} {source!r}: {named} holds {what}, which torch refuses to unpickle "
        "(loading it would run code from the file). Use safetensors weights, or re-save the model from a copy "
        "you trust"
    )


def load_tokenizer(model: str, tokenizer: str | None = None, *, role: str | None = None):
    """The tokenizer a model reads text with (its own unless ``tokenizer`` names another)."""
    from transformers import AutoTokenizer

    source, extra = split_gguf(tokenizer or model)
    with _loading("tokenizer", tokenizer or model, role):
        return AutoTokenizer.from_pretrained(source, **extra)


def load_model_config(model: str, *, role: str | None = None):
    """A model's transformers config, without its weights."""
    from transformers import AutoConfig

    source, extra = split_gguf(model)
    with _loading("model config", model, role):
        return AutoConfig.from_pretrained(source, **extra)


def model_position_limit(model: str) -> int | None:
    """How many positions a model was built for (``max_position_embeddings``, ``n_positions`` for GPT-2), read from
    its config without its weights; None when the config does not say or cannot be read here (loading the model
    later gives the clear error)."""
    try:
        config = load_model_config(model)
    except ModelSourceError:
        return None
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def default_device() -> torch.device:
    """Where a model runs when the caller names no device: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: Dtype, *, cuda: bool) -> str:
    """The concrete dtype name for a configured one: "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return "bfloat16" if cuda else "float32"
    return dtype


def torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a configured one ("auto": bfloat16 on CUDA, float32 elsewhere; see ``resolve_dtype``)."""
    return getattr(torch, resolve_dtype(dtype, cuda=device.type == "cuda"))


def load_model(
    model: str,
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: str | None = None,
    *,
    role: str | None = None,
):
    """Load a causal LM for scoring (eval mode, on ``device``)."""
    from transformers import AutoModelForCausalLM

    source, extra = split_gguf(model)
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    with _loading("model", model, role):
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    return loaded.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# The policy, as training builds it and evaluation loads it
# ----------------------------------------------------------------------------------------------------------------


def load_policy(config: MRPOConfig, device: torch.device | None = None, *, model=None):
    """The policy model, with LoRA adapters when configured (the base then is the initialising reference).

    ``model``: a model object to train instead of loading ``policy.model`` (``mrpo.build_trainer``'s; used as it is,
    its dtype and device included)."""
    if model is None:
        # On the CPU for now; the dtype is the one for where the Trainer will train.
        accelerator = default_device()
        model = load_model(
            config.policy.model,
            torch_dtype(config.policy.dtype, accelerator),
            device or torch.device("cpu"),
            config.policy.attn_implementation,
            role="policy",
        )
    model.train()
    if config.lora.enabled:
        model = add_lora(model, config.lora)
    if config.policy.compile is True:  # "auto" is resolved by fast_path before (assemble_trainer)
        warn_compile_without_bucket(config.policy)
        compile_decoder_layers(model)
    return model


_COMPILE_WARNINGS_SAID: set[str] = set()


def warn_compile_without_bucket(policy: PolicyConfig) -> None:
    """Once per process: compiled layers meet token-budget micro-batches without a bucket the user chose.

    Every new (rows, length) shape compiles the layers again, and past torch._dynamo's recompile limit (8 by
    default) they run uncompiled. The default buckets (``batching.bucket_length``: four per doubling) still make
    a dozen or more shapes over a run, exact lengths (``pad_to_multiple_of: 1``) about one per micro-batch."""
    if not (policy.compile is True and policy.micro_batch_tokens) or (policy.pad_to_multiple_of or 0) > 1:
        return
    buckets = (
        "exact lengths (policy.pad_to_multiple_of=1): about one new shape per micro-batch"
        if policy.pad_to_multiple_of == 1
        else "no policy.pad_to_multiple_of: the default buckets (four lengths per doubling) still make a dozen "
        "or more shapes over a run"
    )
    message = (
        f"policy.compile with policy.micro_batch_tokens={policy.micro_batch_tokens} and {buckets}. Each new "
        "micro-batch shape compiles the decoder layers again, and past torch's recompile limit (8) they run "
        "uncompiled. Set policy.pad_to_multiple_of so that shapes repeat: e.g. 256 with padded rows (4 shapes on "
        "UltraFeedback-like lengths with a budget of 4 x the longest pair) or a quarter of the budget with "
        "packed rows (policy.padding_free)."
    )
    if message not in _COMPILE_WARNINGS_SAID:
        _COMPILE_WARNINGS_SAID.add(message)
        logger.warning(message)


def add_lora(model: torch.nn.Module, lora) -> torch.nn.Module:
    """``model`` wrapped with the LoRA adapters of the config's ``lora`` section (targets checked against its
    linear layers first, so a mistyped target is a ConfigError naming the layers there are)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    linear_names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    check_lora_targets(lora, linear_names)
    target = lora.target_modules
    with peft_wrapping():
        return get_peft_model(
            model,
            PeftLoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=target if isinstance(target, str) else list(target),
                task_type="CAUSAL_LM",
            ),
        )


def check_lora_targets(config: LoraConfig, module_names: Iterable[str]) -> None:
    """Raise a ConfigError if a LoRA target module matches none of the model's module names.

    ``module_names`` are the names of the model's linear modules, e.g.
    ``[name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]``. A target matches
    a module whose name is the target or ends with ``"." + target`` (peft's rule). Nothing to check when LoRA is
    off or the target is "all-linear".
    """
    if not config.enabled or config.target_modules == "all-linear":
        return
    names = list(module_names)
    missing = [
        target
        for target in config.target_modules
        if not any(_lora_target_matches(target, name) for name in names)
    ]
    if not missing:
        return
    available = sorted({name.rsplit(".", 1)[-1] for name in names})
    shown = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "") if available else "none"
    hint = did_you_mean(missing[0], available) if len(missing) == 1 else ""
    raise ConfigError(
        f"'lora.target_modules' = {config.target_modules!r}: the model has no module named {', '.join(map(repr, missing))}"
        f'{hint}; its linear modules are named: {shown} (or use "all-linear")',
        key="lora.target_modules",
    )


def _lora_target_matches(target: str, module_name: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Where peft wraps a model: peft (0.21) asks it for ``is_gradient_checkpointing``, the name transformers
    >= 5.2x deprecates for ``is_activation_checkpointing`` (a FutureWarning per wrapped model, nothing a user can
    act on). Our own code asks neither; older transformers (5.17) do not warn."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def compile_decoder_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` each decoder layer in place (they share one graph per input shape).

    Only the layers: the document mask is built, and the chunked LM head runs in a hook, outside them, where their
    data-dependent shapes would break a graph. Hooks, LoRA adapters and checkpoints are untouched.
    """
    from mrpo.logprobs import unwrap_model

    decoder = unwrap_model(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(
            f"policy.compile: {type(decoder).__name__} has no `layers` to compile; set policy.compile to false"
        )
    for layer in layers:
        layer.compile(dynamic=False)


def check_lora_before_precompute(config: MRPOConfig) -> None:
    """Catch a LoRA target the policy lacks before minutes of precompute, on a weightless (meta) copy."""
    if not config.lora.enabled or config.lora.target_modules == "all-linear":
        return
    from transformers import AutoModelForCausalLM

    model_config = load_model_config(config.policy.model, role="policy")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    linear_names = [name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)]
    check_lora_targets(config.lora, linear_names)


def load_for_evaluation(config: MRPOConfig, checkpoint: str | None, device: torch.device):
    """The starting policy (``checkpoint=None``), a LoRA adapter directory on top of it, or a full model dir."""
    dtype = torch_dtype(config.policy.dtype, device)
    if checkpoint is None:
        return load_model(config.policy.model, dtype, device, role="policy")
    if (Path(checkpoint) / "adapter_config.json").exists():
        from peft import PeftModel

        base = load_model(config.policy.model, dtype, device, role="policy")
        with _loading("LoRA adapter", checkpoint, "checkpoint"), peft_wrapping():
            return PeftModel.from_pretrained(base, checkpoint).to(device).eval()
    return load_model(checkpoint, dtype, device, role="checkpoint")
