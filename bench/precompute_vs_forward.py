"""Reference precompute throughput: a bare forward (the floor), mrpo's precompute path, and TRL 1.16's.

All three score the same model on the same token sequences in one process, and each reports real (non-padding)
tokens per second:

  bare   ``model(input_ids, attention_mask).logits`` under ``torch.inference_mode`` over the batches mrpo builds
         (length-sorted, padded, ``batching.token_budget_batches`` with ``--batch-tokens``). No log-softmax at all; it
         runs the LM head on every position (mrpo only on completion positions), so mrpo can edge past it.
  mrpo   ``mrpo.references.score_pairs`` on the same ``TokenizedPair`` list and token budget (it batches, pads,
         runs ``sequence_logps`` and gathers the completion log-probs). Excludes model loading and cache I/O.
  trl    ``DPOTrainer._precompute_ref_logps`` of TRL 1.16 (what ``precompute_ref_log_probs=True`` runs while the
         trainer is built: its DataLoader in dataset order with ``DataCollatorForPreference``, its
         ``compute_ref_log_probs`` per batch, then writing the Arrow cache file). The trainer is built with
         ``precompute_ref_log_probs=True`` on a one-row placeholder and the method is then called on a dataset of the very same
         ``prompt_ids``/``chosen_ids``/``rejected_ids``, so dataset tokenization is not timed. TRL batches a fixed
         number of pairs (``precompute_ref_batch_size``); it is set so that its mean padded batch is about
         ``--batch-tokens``.

The log-probs of mrpo and TRL are compared too (they must agree to float32 rounding).

    python bench/precompute_vs_forward.py --size tiny              # random-init ~12M Llama, CPU, < 2 min
    python bench/precompute_vs_forward.py --size small --device cuda --pairs 2000 --batch-tokens 32768
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

SIZES = {
    # ~12M parameters: runs in well under 2 minutes on 2 CPU cores with the default pairs.
    "tiny": dict(words=2000, hidden=384, layers=6, heads=6, intermediate=1024, pairs=256, max_words=160),
    # ~110M parameters (GPT-2-small-like shape): for a GPU or a patient CPU.
    "small": dict(words=16000, hidden=768, layers=12, heads=12, intermediate=2048, pairs=1024, max_words=480),
}


def build_tokenizer(words: int):
    """A word-level tokenizer over ``w0 .. w{words-1}``, with EOS = PAD, no BOS, no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<eos>",
        pad_token="<eos>",
        unk_token="<unk>",
        padding_side="right",
    )


def build_model(shape: dict, vocab_size: int, eos_id: int, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=eos_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def build_pairs(n: int, words: int, max_words: int, seed: int = 0):
    """Standard string pairs of random words with varied lengths (prompt and completions)."""
    from mrpo.data.sources import pairs_from_records

    rng = random.Random(seed)

    def text(length: int) -> str:
        return " ".join(f"w{rng.randrange(words)}" for _ in range(length))

    records = []
    for _ in range(n):
        prompt = text(rng.randint(8, max_words // 2))
        records.append(
            {
                "prompt": prompt,
                "chosen": " " + text(rng.randint(4, max_words // 2)),
                "rejected": " " + text(rng.randint(4, max_words // 2)),
            }
        )
    return pairs_from_records(records)


def time_round_robin(paths: dict[str, Callable[[], object]], device: str, repeats: int):
    """Best wall time of each path over ``repeats`` rounds (after one warm-up run each), and each last result.

    The paths take turns within every round, so a change in machine load during the bench hits all of them alike.
    """
    results = {
        name: function() for name, function in paths.items()
    }  # warm-up: allocator, kernels, lazy imports
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats):
        for name, function in paths.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = function()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
            print(f"  {name}: {best[name]:.2f} s", flush=True)
    return best, results


def bare_forward(model, view, tokenized, batch_tokens: int, device: str) -> Callable[[], None]:
    from mrpo.batching import pad_batch, token_budget_batches

    sequences = [s for pair in tokenized for s in (pair.chosen, pair.rejected)]
    batches = [
        pad_batch(
            [sequences[i] for i in batch], pad_token_id=view.pad_token_id, padding_side=view.padding_side
        )
        for batch in token_budget_batches([len(s.input_ids) for s in sequences], batch_tokens)
    ]

    @torch.inference_mode()
    def run() -> None:
        for batch in batches:  # padding is built outside the timed loop: the floor is the forward alone
            _ = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits

    return run


def trl_precompute(model, tokenizer, tokenized, batch_size: int, device: str, output_dir: str):
    """A TRL 1.16 DPOTrainer around ``model`` and a callable that runs its reference precompute once."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    def as_columns():
        rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
        for pair in tokenized:
            prompt_length = pair.chosen.prompt_length
            rows["prompt_ids"].append(list(pair.chosen.input_ids[:prompt_length]))
            rows["chosen_ids"].append(list(pair.chosen.input_ids[prompt_length:]))
            rows["rejected_ids"].append(list(pair.rejected.input_ids[prompt_length:]))
        return rows

    args = DPOConfig(
        output_dir=output_dir,
        # True keeps TRL from loading a second copy as ref_model; at construction it precomputes the one-row
        # placeholder dataset below (not timed). The precompute of the bench data is called and timed afterwards.
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=batch_size,
        per_device_train_batch_size=batch_size,
        max_length=None,
        report_to="none",
        use_cpu=not device.startswith("cuda"),
        bf16=False,
        dataloader_pin_memory=False,
    )
    text_dataset = Dataset.from_dict({"prompt": ["w1"], "chosen": [" w2"], "rejected": [" w3"]})
    trainer = DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=text_dataset, processing_class=tokenizer
    )
    # In memory, so TRL writes its cache file under a fresh random name on every call (never a cache hit).
    dataset = Dataset.from_dict(as_columns())

    def run():
        with_logps = trainer._precompute_ref_logps(dataset, "bench", batch_size)
        return torch.tensor(with_logps["ref_chosen_logps"]), torch.tensor(with_logps["ref_rejected_logps"])

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--pairs", type=int, default=None, help="number of pairs (default: per size)")
    parser.add_argument(
        "--batch-tokens", type=int, default=8192, help="token budget of a batch, padding included"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on cuda"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per path after a warm-up (best is kept)"
    )
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--output", help="also write the results (seconds, tokens/s, ratios) as JSON here")
    args = parser.parse_args(argv)

    from mrpo.data.tokenization import ModelView, tokenize_for_models
    from mrpo.references import score_pairs

    shape = SIZES[args.size]
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    tokenizer = build_tokenizer(shape["words"])
    model = build_model(shape, len(tokenizer), tokenizer.eos_token_id, dtype, args.device)
    view = ModelView(tokenizer, name="bench")
    pairs = build_pairs(args.pairs or shape["pairs"], shape["words"], shape["max_words"])
    tokenized = tokenize_for_models(pairs, [view], max_length=None).per_view[0]
    lengths = [len(s.input_ids) for pair in tokenized for s in (pair.chosen, pair.rejected)]
    real_tokens = sum(lengths)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama {parameters / 1e6:.1f}M params, vocab {len(tokenizer)}, {dtype}, device {args.device}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"data: {len(tokenized)} pairs, {len(lengths)} sequences, {real_tokens} real tokens "
        f"(length mean {statistics.mean(lengths):.0f}, max {max(lengths)}), batch budget {args.batch_tokens} tokens"
    )

    paths: dict[str, Callable[[], object]] = {
        "bare forward (floor)": bare_forward(model, view, tokenized, args.batch_tokens, args.device),
        "mrpo score_pairs": lambda: score_pairs(model, view, tokenized, args.batch_tokens, lambda _: None),
        "mrpo score_pairs, prefix-shared rows": lambda: score_pairs(
            model, view, tokenized, args.batch_tokens, lambda _: None, prefix_shared=True
        ),
    }
    output_dir = tempfile.TemporaryDirectory()
    if not args.skip_trl:
        batch_size = max(1, round(args.batch_tokens / (2 * statistics.mean(lengths))))
        trl_name = f"trl _precompute_ref_logps (batch {batch_size} pairs)"
        paths[trl_name] = trl_precompute(
            model, tokenizer, tokenized, batch_size, args.device, output_dir.name
        )
    results, outputs = time_round_robin(paths, args.device, args.repeats)
    output_dir.cleanup()
    if not args.skip_trl:
        ours = outputs["mrpo score_pairs"][0]
        trl_logps = torch.stack(outputs[trl_name], dim=1).float()
        print(f"max |mrpo - trl| log-prob difference: {(trl_logps - ours).abs().max().item():.2e} nats")

    print(f"\n{'path':<48} {'seconds':>8} {'real tokens/s':>14}")
    for name, seconds in results.items():
        print(f"{name:<48} {seconds:>8.2f} {real_tokens / seconds:>14,.0f}")
    ours_seconds = results["mrpo score_pairs"]
    print(f"\nmrpo / bare throughput: {results['bare forward (floor)'] / ours_seconds:.2f}")
    shared_seconds = results["mrpo score_pairs, prefix-shared rows"]
    print(f"mrpo prefix-shared / bare throughput: {results['bare forward (floor)'] / shared_seconds:.2f}")
    trl_seconds = [s for name, s in results.items() if name.startswith("trl")]
    if trl_seconds:
        print(f"mrpo / trl throughput:  {trl_seconds[0] / ours_seconds:.2f}")
    if args.output:
        summary = {
            "device": args.device,
            "real_tokens": real_tokens,
            "seconds": results,
            "mrpo_vs_bare": results["bare forward (floor)"] / ours_seconds,
            "mrpo_shared_vs_bare": results["bare forward (floor)"] / shared_seconds,
        }
        Path(args.output).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
