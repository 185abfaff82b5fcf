"""Tiny tokenizers and causal LMs built in-process (no network), shared by the test suite.

Two deliberately different model families, like the policy and an external reference of a real run:

- `bpe_tokenizer()` + `tiny_llama()`: a byte-level BPE tokenizer with a ChatML chat template (eos `<|im_end|>`,
  pads right with eos, no BOS), like SmolLM2-Instruct. Its vocabulary holds a "\\n\\n" token, so a prompt ending
  in "\\n" followed by a completion starting with "\\n" merges across the boundary.
- `char_tokenizer()` + `tiny_gemma3()`: a character-level tokenizer that adds BOS, pads left with id 0 and has no
  chat template, like Gemma-3-270M base; the model has Gemma's final logit soft-capping.

Everything is seeded, so tests stay fast and deterministic. Tokenizers are cached per process and shared: copy one
(`copy.deepcopy`) before changing it. Models are float32; for bf16 use `.to(torch.bfloat16)` (the same weights,
rounded), not a bf16 init, which draws other weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma-style turns, with BOS written by the template itself (as Gemma's instruct templates do).
GEMMA_LIKE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

QWEN2_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

CORPUS = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome.",
    "Two plus two is four.\n\nThree plus three is six.",
    "What is the capital of Spain?\n\nMadrid is the capital of Spain.",
    "Question: What colour is the sky?\nAnswer: The sky is blue.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog.\n\n",
    "User: Hello there!\n\nAssistant: Hi, how can I help you today?",
    "A cat is an animal. A dog is an animal. A rose is a flower.",
    "1 + 1 = 2\n2 + 2 = 4\n3 + 3 = 6\n\n10 - 3 = 7",
]


@functools.cache
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab ~400) with a ChatML template; eos = pad = `<|im_end|>`, no BOS, pads right."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    # Qwen2's split pattern (SmolLM2's is alike): unlike GPT-2's it keeps "\n\n" before a word in one piece.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        padding_side="right",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    assert len(tokenizer.encode("\n\n", add_special_tokens=False)) == 1, (
        "the corpus must teach a '\\n\\n' merge"
    )
    return tokenizer


@functools.cache
def char_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: pad 0, eos 1, bos 2 (added to every encoding), pads left, no chat template."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    characters = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@dataclass(frozen=True)
class Pair:
    """Stands in for `mrpo.data.sources.PreferencePair` where a test needs a pair and nothing of the data module."""

    pair_id: str
    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]
    metadata: dict = field(default_factory=dict)


def standard_pairs() -> list[Pair]:
    """Three string pairs of different lengths; the last one's prompt ends in "\\n" before a "\\n" (a merge)."""
    return [
        Pair("capital", "The capital of France is", " Paris.", " Rome, the capital of Italy."),
        Pair("sum", "Two plus two is", " four.", " six."),
        Pair("sky", "Question: What colour is the sky?\n", "\nThe sky is blue.", "\nGreen."),
    ]


def conversational_pairs() -> list[Pair]:
    return [
        Pair(
            "chat-capital",
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Spain?"}],
            [{"role": "assistant", "content": "Madrid."}],
            [{"role": "assistant", "content": "Paris, I think."}],
        ),
        Pair(
            "chat-sum",
            [{"role": "user", "content": "What is 2 + 2?"}],
            [{"role": "assistant", "content": "4"}],
            [{"role": "assistant", "content": "5"}],
        ),
    ]


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_llama(vocab_size: int | None = None, *, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32) for `bpe_tokenizer()`, eval mode, sdpa attention."""
    tokenizer = bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,  # larger than the default so that log-probs are far from uniform
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    _seeded(seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    return model.eval()


def tiny_gemma3(
    vocab_size: int | None = None,
    *,
    seed: int = 0,
    final_logit_softcapping: float | None = 3.0,
) -> Gemma3ForCausalLM:
    """A 2-layer Gemma-3 text model (hidden 32, tied embeddings) for `char_tokenizer()`, eval mode.

    The small soft-cap (Gemma-2 uses 30) makes the cap change log-probs visibly, so a test notices if it is skipped.
    """
    tokenizer = char_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=final_logit_softcapping,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    _seeded(seed)
    model = Gemma3ForCausalLM._from_config(config, attn_implementation="eager")
    return model.eval()


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Write `model` and `tokenizer` with `save_pretrained`, so `from_pretrained(directory)` loads them offline."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def two_family_run_setup(root: Path, records: list[dict]) -> dict[str, Path]:
    """A CLI run's inputs under ``root``: ``records`` as ``pairs.jsonl``, and a policy of one family (``llama``,
    BPE + ChatML) and a reference of another (``gemma``, characters, no chat template) saved as model dirs."""
    import json

    train = root / "pairs.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in records), encoding="utf-8")
    return {
        "root": root,
        "train": train,
        "llama": save_model_dir(tiny_llama(), bpe_tokenizer(), root / "llama"),
        "gemma": save_model_dir(tiny_gemma3(), char_tokenizer(), root / "gemma"),
    }
