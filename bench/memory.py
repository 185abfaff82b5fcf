"""Memory of the LM head with a 262k vocabulary: 1,024-row chunks (the old default) against chunks sized by the
vocabulary (``logprobs.default_chunk_size``: 2^26 / V rows, 256 for Gemma-3), in one run.

The model is Gemma-3-270M-shaped with random weights in float32 (hidden 640, 18 layers, 4 heads of 256, one
key/value head, MLP 2048, vocabulary 262,144, tied embeddings): the shape is read from the config.json of the
Gemma-3-270M that ``mrpo demo`` caches under ``~/.cache/mrpo/models/gemma-3-270m`` when it is there (only the
config; no weights are read), else from the numbers above. It prints, for each chunk size:

  head      the LM head alone while scoring (no gradient): ``_chunked_target_logps`` over the final hidden states
            of 8 sequences x 512 tokens (3,072 completion positions), the float32 logits and the log-softmax's
            temporaries. Goal: <= 0.5 GiB.
  scoring   ``sequence_logps`` under ``torch.inference_mode`` on the same batch, as ``mrpo precompute`` and
            evaluation run it: the forward's activations plus the head.
  train     one training step of 4 sequences x 512 tokens (128 prompt + 384 completion tokens each): the forward
            through ``sequence_logps`` with gradient (each head chunk checkpointed), backward, a plain SGD step.
            Goal: <= 5 GiB above the model (the gradients, activations and head; the issue's 7.73 GiB with
            1,024-row chunks is this figure), "in all" adds the float32 weights (1.0 GiB).

How it measures. PyTorch keeps no peak of CPU allocations (``torch.cuda.max_memory_allocated`` has no CPU twin),
so each measure runs in a fresh subprocess and reads the kernel's accounting of the process's resident memory:
after the model and the inputs are built, it writes ``5`` to ``/proc/self/clear_refs`` (which resets the peak
resident set size, ``VmHWM``, to the current one), runs the measured call once, and reads ``VmHWM`` from
``/proc/self/status``. "above model" is that peak minus the resident size just before the call (the model and
its inputs); "in all" is the peak minus the resident size before the model was built (the interpreter and the
libraries excluded). Large tensors are mmapped by glibc and returned to the system when freed, so the resident
peak is the live peak of the allocations; freed small blocks the allocator keeps can only make the figure higher.
Linux only. Peak memory does not depend on the machine's load; the run takes a few minutes on 2 CPU cores (every
variant does the full 262k-word projection in float32).

    .venv/bin/python bench/memory.py                      # all three measures, both chunk sizes
    .venv/bin/python bench/memory.py --measures head train
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GEMMA_CONFIG = Path.home() / ".cache" / "mrpo" / "models" / "gemma-3-270m" / "config.json"
GEMMA_270M = dict(
    vocab_size=262_144,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    sliding_window=512,
    max_position_embeddings=32_768,
    query_pre_attn_scalar=256,
    tie_word_embeddings=True,
)
MEASURES = ("head", "scoring", "train")
GOALS_GIB = {"head": ("above model", 0.5), "train": ("above model", 5.0)}
SEQUENCE_LENGTH = 512
PROMPT_LENGTH = {"head": 128, "scoring": 128, "train": 128}
SEQUENCES = {"head": 8, "scoring": 8, "train": 4}
GIB = 2**30


def resident_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")


def gemma_config():
    from transformers import Gemma3TextConfig

    shape = dict(GEMMA_270M)
    if GEMMA_CONFIG.is_file():
        config = json.loads(GEMMA_CONFIG.read_text(encoding="utf-8"))
        shape.update({name: config[name] for name in GEMMA_270M if name in config})
        if "layer_types" in config:
            shape["layer_types"] = config["layer_types"]
    return Gemma3TextConfig(**shape, attn_implementation="sdpa", pad_token_id=0)


def batch(config, measure: str):
    """Right-padded-free batch: every sequence SEQUENCE_LENGTH tokens, its completion after PROMPT_LENGTH."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shape = (SEQUENCES[measure], SEQUENCE_LENGTH)
    input_ids = torch.randint(4, config.vocab_size, shape, generator=generator)
    completion_mask = torch.zeros(shape, dtype=torch.long)
    completion_mask[:, PROMPT_LENGTH[measure] :] = 1
    return input_ids, torch.ones_like(input_ids), completion_mask


def run_one(measure: str, chunk_size: int | None) -> dict:
    """In this process: build the model, measure one call, return the figures."""
    import torch
    from transformers import Gemma3ForCausalLM

    from mrpo import logprobs
    from mrpo.batching import prediction_positions

    torch.manual_seed(0)
    before_model = resident_bytes("VmRSS")
    config = gemma_config()
    model = Gemma3ForCausalLM(config).float().train(measure == "train")
    input_ids, attention_mask, completion_mask = batch(config, measure)
    chunk = chunk_size or logprobs.default_chunk_size(config.vocab_size)
    if measure == "head":
        with torch.inference_mode():
            hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows, cols = prediction_positions(completion_mask.bool())
        targets = input_ids[rows, cols + 1]
        head = logprobs._reproducible_head(model)

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4) if measure == "train" else None
    before_call = resident_bytes("VmRSS")
    reset_peak()
    if measure == "head":
        with torch.inference_mode():
            logprobs._chunked_target_logps(hidden, rows, cols, targets, head, chunk)
    elif measure == "scoring":
        with torch.inference_mode():
            logprobs.sequence_logps(model, input_ids, attention_mask, completion_mask, chunk_size=chunk)
    else:
        result = logprobs.sequence_logps(model, input_ids, attention_mask, completion_mask, chunk_size=chunk)
        result.logps.mean().backward()
        optimizer.step()
    peak = resident_bytes("VmHWM")
    return {
        "measure": measure,
        "chunk": chunk,
        "positions": int(completion_mask[:, 1:].sum()),
        "above_model": peak - before_call,
        "in_all": peak - before_model,
    }


def measure_in_subprocess(measure: str, chunk_size: int | None) -> dict:
    command = [sys.executable, __file__, "--child", measure, str(chunk_size or 0)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = [
        f"{'measure':<8} {'chunk rows':>10} {'positions':>9} {'above model':>12} {'in all':>9}  goal",
        "-" * 62,
    ]
    for r in results:
        goal = GOALS_GIB.get(r["measure"])
        verdict = ""
        if goal is not None and r["variant"] == "after":
            column, limit = goal
            value = r["above_model" if column == "above model" else "in_all"] / GIB
            verdict = f"{column} <= {limit} GiB: {'met' if value <= limit else 'NOT met'}"
        lines.append(
            f"{r['measure']:<8} {r['chunk']:>10} {r['positions']:>9} {r['above_model'] / GIB:>8.2f} GiB"
            f" {r['in_all'] / GIB:>5.2f} GiB  {verdict}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measures", nargs="+", choices=MEASURES, default=list(MEASURES))
    parser.add_argument("--child", nargs=2, metavar=("MEASURE", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure, chunk = args.child
        print(json.dumps(run_one(measure, int(chunk) or None)))
        return
    source = GEMMA_CONFIG if GEMMA_CONFIG.is_file() else "Gemma3TextConfig, 270M shape"
    print(f"Gemma-3-270M-shaped model (random float32 weights; shape from {source}), peak resident memory")
    results = []
    for measure in args.measures:
        for variant, chunk in (("before", 1024), ("after", None)):
            result = measure_in_subprocess(measure, chunk)
            results.append({**result, "variant": variant})
            print(f"  {measure} {variant}: {result['above_model'] / GIB:.2f} GiB above the model", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
