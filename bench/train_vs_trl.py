"""Training throughput: TRL's DPOTrainer vs mrpo's MRPOTrainer, same model, data and global batch, one process.

What is compared (every variant trains the same randomly initialised model on the same pairs, 8 pairs per optimizer
step, steps WARMUP+1..STEPS timed, tokens counted as TRL counts them for every variant: prompt + chosen + prompt +
rejected, no padding -- so a variant that computes the prompt once is credited with the work it saved):

- ``trl_gc0`` / ``trl_gc1``: TRL 1.16 ``DPOTrainer`` with precomputed reference log-probs, without / with its
  default gradient checkpointing (the baseline of the speed goal);
- ``mrpo_k1_padded``: mrpo with one cached reference (DPO), padded batches, sdpa;
- ``mrpo_k1_padded_budget``: the same with token-budget micro-batches (``policy.micro_batch_tokens``, default room
  for two of the longest pairs): each step's 8 pairs sorted by length and split so that no forward pads beyond the
  budget; the optimizer still steps on all 8; each micro-batch's length rounded to four per doubling
  (``batching.bucket_length``), so shapes repeat; ``mrpo_k1_padded_budget_exact``: the same at exact lengths
  (``pad_to_multiple_of=1``: a new shape almost every micro-batch, as before the buckets);
- ``mrpo_k1_packed`` / ``mrpo_k4_packed``: padding-free batches (flex_attention on CUDA, sdpa on CPU) with one and
  four cached references. The four columns are the one computed reference plus shifted copies: a step's cost
  does not depend on the values, and references are never in memory during training -- that is the claim measured;
- ``mrpo_k1_packed_compiled``: the same with the decoder compiled (``--compile``), rows padded to a multiple of
  ``--bucket`` tokens so the compiler sees few shapes;
- ``mrpo_k1_shared``: prefix-shared rows (``policy.prefix_shared``): one row per pair, [prompt | chosen | rejected],
  the prompt computed once, sdpa with a 4D mask.

``--shape`` picks the data: ``ultrafeedback`` (default; prompts shorter than the answers) or ``long-prompt``
(multi-turn-like prompts, at least 3x each answer's length, as in HH-RLHF, where the prompt is most of the tokens).

Prints one ``RESULT {json}`` line per variant (real tokens/s, MFU against the GPU's dense bf16 peak, step time, peak
memory) and a table of ratios to ``trl_gc0``. ``--size tiny`` runs on a CPU in a few minutes; ``--size qwen0.5b``
(random-init Qwen2.5-0.5B shape, vocab 151936) is the GPU measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback  # noqa: E402

from mrpo.collator import PreferenceCollator, PreferenceDataset  # noqa: E402
from mrpo.config.schema import LossConfig  # noqa: E402
from mrpo.data.token_store import TokenizedPair, TokenizedSequence
from mrpo.data.tokenization import ModelView
from mrpo.models import compile_decoder_layers  # noqa: E402
from mrpo.references import score_pairs  # noqa: E402
from mrpo.trainer import MRPOTrainer  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16, SXM


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer ("w17" -> 17), so that text lengths in words are token lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def make_rows(
    num_pairs: int, vocab_size: int, tiny: bool, seed: int = 0, shape: str = "ultrafeedback"
) -> list[dict[str, str]]:
    """UltraFeedback-like lengths: prompt ~ lognormal median 150 words, completions ~ median 250 (tiny: short);
    ``shape="long-prompt"``: ``long_prompt_rows``."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(2, vocab_size)}" for _ in range(n))

    if shape == "long-prompt":
        return long_prompt_rows(num_pairs, tiny, rng, words)

    def prompt_length() -> int:
        return rng.randint(8, 40) if tiny else min(int(rng.lognormvariate(math.log(150), 0.8)) + 8, 600)

    def completion_length() -> int:
        return rng.randint(4, 40) if tiny else min(int(rng.lognormvariate(math.log(250), 0.6)) + 8, 700)

    return [
        {
            "prompt": words(prompt_length()),
            "chosen": " " + words(completion_length()),
            "rejected": " " + words(completion_length()),
        }
        for _ in range(num_pairs)
    ]


def long_prompt_rows(num_pairs: int, tiny: bool, rng: random.Random, words) -> list[dict[str, str]]:
    """Multi-turn-like pairs: a prompt of several turns (each opened by a speaker word, "w2" or "w3"), at least 3x as
    long as either answer, everything within 1,024 tokens (tiny: 2-5 turns of 8-30 words, answers of 4-20)."""

    def answer_length() -> int:
        return rng.randint(4, 20) if tiny else min(int(rng.lognormvariate(math.log(80), 0.5)) + 8, 230)

    def turn_length() -> int:
        return rng.randint(8, 30) if tiny else min(int(rng.lognormvariate(math.log(60), 0.6)) + 4, 200)

    rows = []
    for _ in range(num_pairs):
        chosen, rejected = answer_length(), answer_length()
        turns = []
        for turn in range(rng.randint(2, 5) if tiny else rng.randint(3, 8)):
            turns.append(f"w{2 + turn % 2} " + words(turn_length()))
        prompt = " ".join(turns)
        length = len(prompt.split())
        if length < 3 * max(chosen, rejected):  # pad the last turn up to 3x the longer answer
            prompt += " " + words(3 * max(chosen, rejected) - length)
        prompt = " ".join(prompt.split()[:760])
        rows.append(
            {"prompt": prompt + " w3", "chosen": " " + words(chosen), "rejected": " " + words(rejected)}
        )
    return rows


def model_config(size: str, vocab_size: int) -> Qwen2Config:
    if size == "tiny":
        config = Qwen2Config(
            vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
    else:  # Qwen2.5-0.5B shape: 494M parameters
        config = Qwen2Config(
            vocab_size=vocab_size, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            tie_word_embeddings=True, rope_theta=1000000.0,
        )  # fmt: skip
    config.pad_token_id, config.eos_token_id = 0, 1
    return config


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step (after a device sync) and real tokens per step."""

    def __init__(self, device: str):
        self.device = device
        self.times: dict[int, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times[state.global_step] = time.perf_counter()


def measure(name: str, clock: StepClock, window_tokens: int, args, n_params: int, peak_flops: float, **extra):
    """Throughput over optimizer steps warmup+1..steps, from ``window_tokens`` real tokens in those steps."""
    seconds = clock.times[args.steps] - clock.times[args.warmup]
    result = {
        "name": name,
        "tokens_per_s": round(window_tokens / seconds),
        "step_s": round(seconds / (args.steps - args.warmup), 4),
        "mfu": round(6 * n_params * window_tokens / seconds / peak_flops, 4) if peak_flops else None,
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if args.device == "cuda"
        else None,
        **extra,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return result


def run_trl(args, rows, tokenizer, config, gradient_checkpointing: bool, n_params: int, peak: float):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    clock = StepClock(args.device)
    cumulative: dict[int, float] = {}

    class CountTokens(TrainerCallback):  # TRL logs cumulative num_tokens (non-padding) every logging step
        def on_log(self, a, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                cumulative[state.global_step] = logs["num_tokens"]

    trl_args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=args.pairs_per_step,
        max_steps=args.steps,
        learning_rate=1e-6,
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        max_length=args.max_length,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=16,
        gradient_checkpointing=gradient_checkpointing,
        report_to="none",
        save_strategy="no",
        logging_steps=math.gcd(
            args.warmup, args.steps
        ),  # the same logging cadence as ours; ends of the window
        dataloader_num_workers=0,
        seed=0,
    )
    model = new_model(config, args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = DPOTrainer(
        model=model, args=trl_args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=[clock, CountTokens()],
    )  # fmt: skip
    trainer.train()
    window_tokens = cumulative[args.steps] - cumulative[args.warmup]
    result = measure(f"trl_gc{int(gradient_checkpointing)}", clock, window_tokens, args, n_params, peak)
    del trainer, model
    cleanup(args)
    return result


def tokenize(rows, view: ModelView, max_length: int) -> list[TokenizedPair]:
    """Our tokenization of the same strings (EOS appended to completions, like TRL), truncated like TRL."""
    from mrpo.data.pairs import PreferencePair

    pairs = []
    for row in rows:
        pair = view.tokenize(PreferencePair.build(row["prompt"], row["chosen"], row["rejected"]))
        chosen, rejected = (
            TokenizedSequence(s.input_ids[:max_length], s.prompt_length) for s in (pair.chosen, pair.rejected)
        )
        pairs.append(TokenizedPair(pair.pair_id, chosen, rejected))
    return pairs


def run_mrpo(
    args, pairs, view, reference_logps, config, *, name, references, packed, compiled, n_params, peak,
    micro_batch_tokens=None, prefix_shared=False, pad_to_multiple_of=None,
):  # fmt: skip
    from transformers import TrainingArguments

    # Prefix-shared rows carry a 4D mask, which sdpa takes as is (flex would add it densely to every score).
    attn = ("flex_attention" if args.device == "cuda" else "sdpa") if packed else "sdpa"
    chosen = torch.stack([reference_logps[:, 0] - 0.5 * k for k in range(references)])
    rejected = torch.stack([reference_logps[:, 1] - 0.7 * k for k in range(references)])
    dataset = PreferenceDataset(pairs, chosen, rejected)
    collator = PreferenceCollator(
        pad_token_id=view.pad_token_id,
        padding_free=packed,
        pad_to_multiple_of=args.bucket if compiled else pad_to_multiple_of,
        micro_batch_tokens=micro_batch_tokens,
        prefix_shared=prefix_shared,
    )
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="mrpo-bench-"),
        per_device_train_batch_size=args.pairs_per_step,
        max_steps=args.steps,
        learning_rate=1e-6,
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        optim="adamw_torch_fused" if args.device == "cuda" else "adamw_torch",
        report_to="none",
        save_strategy="no",
        logging_steps=math.gcd(args.warmup, args.steps),
        dataloader_num_workers=0,
        dataloader_pin_memory=args.device == "cuda",
        seed=0,
    )
    model = new_model(config, args, attn_implementation=attn)
    if compiled:
        compile_decoder_layers(model)  # what policy.compile does
    clock = StepClock(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = CountingTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collator,
        loss=LossConfig(), callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    window_tokens = sum(trainer.tokens_per_step[args.warmup : args.steps])
    result = measure(name, clock, window_tokens, args, n_params, peak, attention=attn, references=references)
    del trainer, model
    cleanup(args)
    return result


class CountingTrainer(MRPOTrainer):
    """Counts each step's tokens as TRL does (prompt + chosen + prompt + rejected, no padding: the collator's
    ``num_tokens``, whatever the rows' layout) while the batch is still on the host (no device sync)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_per_step: list[int] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        tokens = sum(int(batch["num_tokens"]) for batch in inputs.get("micro_batches", [inputs]))
        self.tokens_per_step.append(tokens)
        return super().training_step(model, inputs, num_items_in_batch)


def new_model(config, args, attn_implementation: str = "sdpa"):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=dtype).to(
        args.device
    )


def cleanup(args):
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "qwen0.5b"], default="tiny")
    parser.add_argument(
        "--shape",
        choices=["ultrafeedback", "long-prompt"],
        default="ultrafeedback",
        help="pair lengths: UltraFeedback-like, or multi-turn-like prompts >= 3x the answers",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 12 tiny, 60 GPU)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed first steps (default 2 tiny, 10 GPU)"
    )
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--bucket", type=int, default=4096, help="packed row length multiple when compiled")
    parser.add_argument("--compile", action="store_true", help="also run the compiled padding-free variant")
    parser.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=None,
        help="token budget of the mrpo_k1_padded_budget variant (default 4 x the longest sequence)",
    )
    parser.add_argument("--only", nargs="*", help="run only these variants, in this order")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="skip variants once this much time is spent"
    )
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args()
    tiny = args.size == "tiny"
    args.steps = args.steps or (12 if tiny else 60)
    args.warmup = args.warmup if args.warmup is not None else (2 if tiny else 10)
    vocab_size = 2000 if tiny else 151936
    started = time.perf_counter()

    import transformers

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), 0.0)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, device {device_name}",
        flush=True,
    )
    tokenizer = word_tokenizer(vocab_size)
    config = model_config(args.size, vocab_size)
    rows = make_rows(args.steps * args.pairs_per_step + 16, vocab_size, tiny, shape=args.shape)
    n_params = sum(p.numel() for p in new_model(config, args).parameters())
    cleanup(args)
    prompt_words = sum(len(row["prompt"].split()) for row in rows)
    answer_words = sum(len(row[side].split()) for row in rows for side in ("chosen", "rejected")) / 2
    print(
        f"model: {n_params / 1e6:.1f}M parameters; {len(rows)} pairs, shape {args.shape} "
        f"(prompt / answer length {prompt_words / answer_words:.2f})",
        flush=True,
    )

    view = ModelView(tokenizer, name="bench")
    pairs = tokenize(rows, view, args.max_length)
    with torch.no_grad():  # the one reference (the initial model) scored once, as mrpo precompute does
        reference_model = new_model(config, args).eval()
        reference_logps, _ = score_pairs(reference_model, view, pairs, 16384, lambda n: None)
        del reference_model
        cleanup(args)

    common = {"n_params": n_params, "peak": peak}
    longest = max(max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) for pair in pairs)
    budget = args.micro_batch_tokens or 4 * longest  # room for two of the longest pairs, padded
    variants = {
        "trl_gc0": lambda: run_trl(args, rows, tokenizer, config, False, n_params, peak),
        "trl_gc1": lambda: run_trl(args, rows, tokenizer, config, True, n_params, peak),
        "mrpo_k1_padded": lambda: run_mrpo(args, pairs, view, reference_logps, config, name="mrpo_k1_padded",
                                           references=1, packed=False, compiled=False, **common),
        "mrpo_k1_padded_budget": lambda: run_mrpo(args, pairs, view, reference_logps, config,
                                                  name="mrpo_k1_padded_budget", references=1, packed=False,
                                                  compiled=False, micro_batch_tokens=budget, **common),
        "mrpo_k1_padded_budget_exact": lambda: run_mrpo(args, pairs, view, reference_logps, config,
                                                        name="mrpo_k1_padded_budget_exact", references=1,
                                                        packed=False, compiled=False, micro_batch_tokens=budget,
                                                        pad_to_multiple_of=1, **common),
        "mrpo_k1_packed": lambda: run_mrpo(args, pairs, view, reference_logps, config, name="mrpo_k1_packed",
                                           references=1, packed=True, compiled=False, **common),
        "mrpo_k4_packed": lambda: run_mrpo(args, pairs, view, reference_logps, config, name="mrpo_k4_packed",
                                           references=4, packed=True, compiled=False, **common),
        "mrpo_k1_shared": lambda: run_mrpo(args, pairs, view, reference_logps, config, name="mrpo_k1_shared",
                                           references=1, packed=False, compiled=False, prefix_shared=True,
                                           **common),
    }  # fmt: skip
    if args.compile:
        variants["mrpo_k1_packed_compiled"] = lambda: run_mrpo(
            args, pairs, view, reference_logps, config, name="mrpo_k1_packed_compiled",
            references=1, packed=True, compiled=True, **common,
        )  # fmt: skip
    results = {}
    unknown = sorted(set(args.only or ()) - set(variants))
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {unknown}; known: {sorted(variants)}")
    for name in args.only or variants:  # --only also sets the order (what runs first survives --budget-s)
        run = variants[name]
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            print(f"SKIPPED {name}: time budget spent", flush=True)
            continue
        try:
            results[name] = run()
        except Exception as error:  # one failing variant must not lose the others' numbers
            import traceback

            traceback.print_exc()
            print(f"FAILED {name}: {error!r}"[:400], flush=True)
    report(results, default_variant(args))
    if args.output:
        Path(args.output).write_text(
            json.dumps({"device": device_name, "shape": args.shape, "results": results}, indent=2)
        )


def default_variant(args) -> str:
    """The variant that is ``mrpo train``'s default path on this device (``mrpo.fast_path`` with the policy
    section left alone and the bench's attention kernel)."""
    from mrpo.config.schema import PolicyConfig
    from mrpo.fast_path import choose_fast_path

    attention = "flex_attention" if args.device == "cuda" else None
    fast = choose_fast_path(
        PolicyConfig(model="bench", attn_implementation=attention), cuda=args.device == "cuda"
    )
    if fast.rows == "prefix_shared":
        return "mrpo_k1_shared"
    if fast.rows == "packed":
        return "mrpo_k1_packed_compiled" if fast.compile else "mrpo_k1_packed"
    return "mrpo_k1_padded"


def report(results: dict, default: str | None = None) -> None:
    baseline = results.get("trl_gc0")
    print(f"\n{'variant':<26}{'tokens/s':>10}{'MFU':>8}{'step s':>9}{'peak GiB':>10}{'x trl_gc0':>11}")
    for name, r in results.items():
        ratio = r["tokens_per_s"] / baseline["tokens_per_s"] if baseline else float("nan")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_GiB']:.2f}" if r["peak_mem_GiB"] is not None else "-"
        label = f"{name} (default)" if name == default else name
        print(f"{label:<26}{r['tokens_per_s']:>10}{mfu:>8}{r['step_s']:>9.4f}{mem:>10}{ratio:>11.2f}")
    trl = {name: r for name, r in results.items() if name.startswith("trl_")}
    if default in results and trl:
        fastest = max(trl, key=lambda name: trl[name]["tokens_per_s"])
        ratio = results[default]["tokens_per_s"] / trl[fastest]["tokens_per_s"]
        print(f"default path {default}: {ratio:.2f}x TRL's fastest variant ({fastest}) in tokens/s")
    for a, b, label in (
        ("mrpo_k4_packed", "mrpo_k1_packed", "K=4 vs K=1 step time"),
        ("mrpo_k1_packed", "mrpo_k1_padded", "packed vs padded step time"),
        ("mrpo_k1_shared", "mrpo_k1_padded", "prefix-shared vs padded step time"),
        (
            "mrpo_k1_padded_budget",
            "mrpo_k1_padded",
            "token-budget micro-batches vs one padded batch, step time",
        ),
    ):
        if a in results and b in results:
            print(f"{label}: {results[a]['step_s'] / results[b]['step_s']:.3f}x")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
