"""How memory and time grow with the number of pairs: load + tokenize, precompute, the first training steps.

For each N (default 10k, 100k, 1M pairs) it writes synthetic standard pairs at UltraFeedback-like lengths (by
default prompts of 100-300 words, completions of 300-900, so ~1,400 tokens a pair), saves a tiny random-init Llama
with a word-level tokenizer (one word = one token), and runs four stages, each in a fresh process started through
the same code the CLI runs, so that its peak resident memory (``ru_maxrss``) is that stage's alone:

| stage | what runs | what is reported |
|---|---|---|
| `tokenize` | ``tokenize_split`` with no tokenized entry in the cache: the data streamed, tokenized for the policy and its one reference, written to disk | wall s, pairs/s (read + tokenize), peak RSS |
| `cached` | ``tokenize_split`` again: the entry found and opened | wall s, peak RSS |
| `precompute` | ``run_precompute`` into an empty reference cache (the tokenized entry found, then every pair scored) | wall s, peak RSS |
| `train` | ``run_train`` with ``max_steps`` 20 on the filled caches: a cached re-run, start-up until the first step, then 20 steps | s to the first step, s for 20 steps, peak RSS |

The first line of the table is the process after its imports (torch, transformers), the floor every stage stands on.
Before an N, the peak RSS of each stage is projected linearly from the two previous sizes (from the floor and the
previous size for the second); an N whose projection exceeds ``--max-rss-gib`` (default: 85% of the memory
available at start) is skipped with its projection printed rather than run into the OOM killer.

    .venv/bin/python bench/scale.py                                  # 10k, 100k, 1M; skips what cannot fit
    .venv/bin/python bench/scale.py --pairs 2000 20000 --output out.json

Nothing here is timed inside a test; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

STAGES = ("tokenize", "cached", "precompute", "train")
TRAIN_STEPS = 20


# -- the data and the model ---------------------------------------------------------------------------------------


def write_pairs(
    path: Path, n: int, words: int, prompt_words: tuple[int, int], completion_words: tuple[int, int]
):
    """N standard pairs of random words, one JSON object a line (written in blocks: the generator holds a block)."""
    import numpy as np

    rng = np.random.default_rng(0)
    vocabulary = np.array([f"w{i}" for i in range(words)], dtype=object)
    block = 2_000
    with path.open("w", encoding="utf-8") as out:
        for start in range(0, n, block):
            lines = []
            for _ in range(min(block, n - start)):
                lengths = (
                    rng.integers(*prompt_words, endpoint=True),
                    rng.integers(*completion_words, endpoint=True),
                    rng.integers(*completion_words, endpoint=True),
                )
                prompt, chosen, rejected = (
                    " ".join(vocabulary[rng.integers(0, words, size)]) for size in lengths
                )
                lines.append(
                    json.dumps({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
                )
            out.write("\n".join(lines) + "\n")


def save_tiny_model(directory: Path, words: int) -> None:
    """A 2-layer Llama (hidden 64) and its word-level tokenizer (EOS = PAD, no BOS, no chat template)."""
    import torch
    from precompute_vs_forward import build_tokenizer  # bench/ is on sys.path: this script runs from it
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(words)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        pad_token_id=1,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_config(path: Path, model: Path, data: Path, work: Path) -> None:
    import yaml

    config = {
        "policy": {"model": str(model), "dtype": "float32"},
        "references": [{"name": "init", "model": str(model), "dtype": "float32"}],
        "data": {"train": str(data), "max_length": 4096},
        "lora": {"enabled": False},
        "training": {
            "output_dir": str(work / "run"),
            "per_device_train_batch_size": 4,
            "max_steps": TRAIN_STEPS,
            "save_strategy": "no",
            "logging_steps": 10,
            "learning_rate": 1e-4,
            "use_cpu": True,
            "disable_tqdm": True,
            "report_to": "none",
        },
        "cache_dir": str(work / "cache"),
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


# -- one stage, in its own process --------------------------------------------------------------------------------


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_stage(stage: str, config_path: str) -> dict:
    import logging

    logging.disable(logging.WARNING)
    from mrpo.config.schema import load_config
    from mrpo.data.token_store import sequence_lengths
    from mrpo.pipeline import run_precompute
    from mrpo.splits import load_views, tokenize_split

    config = load_config(config_path)
    result: dict = {"stage": stage, "rss_after_imports_gib": peak_rss_gib()}
    start = time.perf_counter()
    if stage in ("tokenize", "cached"):
        views = load_views(config)
        result["load_s"] = time.perf_counter() - start  # the tokenizers
        tokenized = tokenize_split(config, "train", views)
        result["pairs"] = len(tokenized.tokenization.pair_ids)
        result["tokens"] = int(sum(sequence_lengths(tokenized.tokenization.per_view[0])))
        result["stored"] = tokenized.pairs is None
    elif stage == "precompute":
        run_precompute(config)
    elif stage == "train":
        import mrpo.trainer
        from mrpo.pipeline import run_train

        entered: list[float] = []
        train = mrpo.trainer.MRPOTrainer.train

        def timed_train(self, *args, **kwargs):
            entered.append(time.perf_counter())
            return train(self, *args, **kwargs)

        mrpo.trainer.MRPOTrainer.train = timed_train
        outcome = run_train(config, overwrite=True, show_progress=False)
        result["first_step_s"] = entered[0] - start
        result["steps_s"] = outcome.train_metrics["train_runtime"]
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_gib"] = peak_rss_gib()
    return result


# -- the driver ---------------------------------------------------------------------------------------------------


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def project(history: list[tuple[int, float]], n: int) -> float | None:
    """Peak RSS at n, linear through the two last measured (n, GiB) points."""
    if len(history) < 2:
        return None
    (n0, r0), (n1, r1) = history[-2:]
    return r1 + (r1 - r0) * (n - n1) / (n1 - n0)


def child(stage: str, config: Path) -> dict:
    command = [sys.executable, __file__, "--child", stage, "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"stage {stage} failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--prompt-words", type=int, nargs=2, default=[100, 300], metavar=("MIN", "MAX"))
    parser.add_argument("--completion-words", type=int, nargs=2, default=[300, 900], metavar=("MIN", "MAX"))
    parser.add_argument("--words", type=int, default=2000, help="vocabulary of the word-level tokenizer")
    parser.add_argument("--max-rss-gib", type=float, default=None, help="skip a size projected above this")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_stage(args.child, args.config)))
        return

    limit = args.max_rss_gib if args.max_rss_gib is not None else 0.85 * available_gib()
    with tempfile.TemporaryDirectory(prefix="mrpo-scale-") as temporary:
        root = args.work_dir or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        model = root / "model"
        if not (model / "config.json").is_file():
            save_tiny_model(model, args.words)
        floor = json.loads(
            subprocess.run(
                [sys.executable, "-c", "import resource, mrpo.pipeline, mrpo.trainer; "
                 "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)"],
                capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
        print(
            f"process after imports: {floor:.2f} GiB; skipping sizes projected above {limit:.1f} GiB",
            flush=True,
        )
        history: dict[str, list[tuple[int, float]]] = {stage: [(0, floor)] for stage in args.stages}
        results = []
        for n in args.pairs:
            projected = {stage: project(history[stage], n) for stage in args.stages}
            over = {s: p for s, p in projected.items() if p is not None and p > limit}
            if over:
                worst = max(over.values())
                print(f"N={n:,}: skipped, projected peak RSS {worst:.1f} GiB > {limit:.1f} GiB", flush=True)
                results.append({"pairs": n, "skipped": True, "projected_peak_rss_gib": projected})
                continue
            work = root / f"n{n}"
            work.mkdir(exist_ok=True)
            data = work / "train.jsonl"
            started = time.perf_counter()
            if not data.is_file():
                write_pairs(data, n, args.words, tuple(args.prompt_words), tuple(args.completion_words))
            config = work / "config.yaml"
            write_config(config, model, data, work)
            row = {
                "pairs": n,
                "data_mib": data.stat().st_size / 2**20,
                "write_s": time.perf_counter() - started,
            }
            for stage in args.stages:
                # Each stage starts from what it measures: no tokenized entry before `tokenize`, no reference
                # store before `precompute` (a reused --work-dir keeps both).
                emptied = {"tokenize": "tokenized-*", "precompute": "store-*"}.get(stage)
                for entry in (work / "cache").glob(emptied or "-"):
                    shutil.rmtree(entry)
                measured = child(stage, config)
                row[stage] = measured
                history[stage].append((n, measured["peak_rss_gib"]))
                print(f"N={n:,} {stage}: {json.dumps(measured)}", flush=True)
            results.append(row)
        report(results, floor, args.stages)
        if args.output:
            args.output.write_text(json.dumps({"floor_gib": floor, "results": results}, indent=2) + "\n")


def report(results: list[dict], floor: float, stages: list[str]) -> None:
    measured = [r for r in results if not r.get("skipped")]
    if not measured:
        return
    first = measured[0]
    print(f"\nprocess after imports: {floor:.2f} GiB peak RSS")
    print("| pairs | stage | wall s | pairs/s | s to first step | peak RSS GiB | × RSS at smallest N |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        if row.get("skipped"):
            worst = max(p for p in row["projected_peak_rss_gib"].values() if p is not None)
            print(f"| {row['pairs']:,} | skipped | | | | projected {worst:.1f} | |")
            continue
        for stage in stages:
            m = row[stage]
            rate = f"{m['pairs'] / (m['wall_s'] - m['load_s']):,.0f}" if stage == "tokenize" else ""
            first_step = f"{m['first_step_s']:.1f}" if stage == "train" else ""
            ratio = m["peak_rss_gib"] / first[stage]["peak_rss_gib"]
            print(
                f"| {row['pairs']:,} | {stage} | {m['wall_s']:.1f} | {rate} | {first_step} | "
                f"{m['peak_rss_gib']:.2f} | {ratio:.2f} |"
            )


if __name__ == "__main__":
    main()
