"""How well does ``mrpo inspect`` find wrongly labelled pairs? Measured in the synthetic world, where the flipped
pairs and what each reference knows are known by construction (issue 11).

Per seed, the synthetic world (``synthetic.py``: facts of sets A, B, C; ``model_A`` knows A, ``model_B`` B,
``model_AB`` both, nobody C) gives one pair per fact (108 pairs: the true value against another value of the
relation). A share of the labels is flipped, stratified by set. The references score the pairs through the real
pipeline (``prepare_split``: tokenization, the content-keyed cache), ``audit.find_suspects`` flags and ranks them,
and the flagged set and the ranking are compared with the truly flipped pairs, next to a random ranking.

    .venv/bin/python experiments/suspect_audit.py [--seeds 10] [--output-dir runs/suspect-audit]

Writes ``docs/results-suspects.md``. The pretrained models are shared with ``synthetic.py`` when both use the same
``--output-dir``/seed layout; they are rebuilt otherwise (seconds per seed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import stats
import synthetic

from mrpo.report_tables import markdown_table

NOISE_RATES = (0.1, 0.2, 0.3, 0.4)
REFERENCE_SETS: dict[str, tuple[str, ...]] = {
    "A + B": ("A", "B"),
    "A + AB": ("A", "AB"),
    "A + B + AB": ("A", "B", "AB"),
}
"""Which references audit the pairs; the first (model_A, the policy's start) is the initialising one."""


def all_fact_pairs(world: synthetic.World, seed: int) -> list[dict[str, Any]]:
    """One pair per fact of the world: chosen the true value, rejected another value of the relation."""
    rng = random.Random(f"suspect-audit-pairs-{seed}")
    pairs = []
    for fact in world.facts:
        wrong = rng.choice([v for v in synthetic.RELATIONS[fact.relation] if v != fact.value])
        pairs.append(
            {
                "prompt": fact.prompt,
                "chosen": f" {fact.value}",
                "rejected": f" {wrong}",
                "fact_set": fact.fact_set,
            }
        )
    return pairs


def flip(pairs: list[dict[str, Any]], rate: float, seed: int) -> list[dict[str, Any]]:
    """Swap chosen and rejected on ``rate`` of each set's pairs (stratified); each row says whether it is flipped."""
    rng = random.Random(f"suspect-audit-flip-{seed}-{rate}")
    flipped = []
    for fact_set in synthetic.SETS:
        indices = [i for i, p in enumerate(pairs) if p["fact_set"] == fact_set]
        flipped += rng.sample(indices, round(rate * len(indices)))
    chosen = set(flipped)
    rows = []
    for index, pair in enumerate(pairs):
        row = dict(pair, flipped=index in chosen)
        if index in chosen:
            row["chosen"], row["rejected"] = pair["rejected"], pair["chosen"]
        rows.append(row)
    return rows


def ranking_quality(scores: Sequence[float], truth: Sequence[bool]) -> dict[str, float]:
    """R-precision (precision among the top |flipped| by score) and average precision of a ranking."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    positives = sum(truth)
    if positives == 0:
        return {"r_precision": float("nan"), "average_precision": float("nan")}
    hits, precision_sum = 0, 0.0
    for rank, index in enumerate(order, start=1):
        if truth[index]:
            hits += 1
            precision_sum += hits / rank
    top = order[:positives]
    return {
        "r_precision": sum(truth[i] for i in top) / positives,
        "average_precision": precision_sum / positives,
    }


def audit_one(models: dict[str, str], rows: list[dict[str, Any]], references: tuple[str, ...], work: Path):
    """Flag and rank ``rows`` with the given references through the real pipeline; compare with the truth."""
    from mrpo.audit_suspects import SUSPECT_THRESHOLD, find_suspects, suspect_scores
    from mrpo.config.schema import MRPOConfig
    from mrpo.prepared_split import prepare_split

    data = work / "pairs.jsonl"
    synthetic.write_jsonl(data, rows)
    config = MRPOConfig.from_dict(
        {
            "policy": {"model": models["A"], "dtype": "float32"},
            "references": [
                {"name": f"model_{n}", "model": models[n], "dtype": "float32"} for n in references
            ],
            "data": {"train": str(data), "max_length": 32},
            "training": {"output_dir": str(work / "unused"), "use_cpu": True},
            "cache_dir": str(work.parent / "cache"),
        }
    )
    prepared = prepare_split(config, "train", show_progress=False)
    ids = prepared.tokenization.pair_ids
    assert len(ids) == len(rows), "the synthetic pairs are short: none may be dropped"
    margins = (
        prepared.dataset.reference_chosen_logps.double() - prepared.dataset.reference_rejected_logps.double()
    )
    names = [f"model_{n}" for n in references]
    flagged = {s.pair_id for s in find_suspects(margins, names, ids, SUSPECT_THRESHOLD)}
    truth = [bool(row["flipped"]) for row in rows]
    is_flagged = [pair_id in flagged for pair_id in ids]
    caught = sum(f and t for f, t in zip(is_flagged, truth, strict=True))
    # The ranking find_suspects uses: the external references' score (all references' when K = 1).
    scores = suspect_scores(margins, range(1, len(names)) if len(names) > 1 else range(1)).tolist()
    result = {
        "pairs": len(rows),
        "flipped": sum(truth),
        "flagged": sum(is_flagged),
        "caught": caught,
        **ranking_quality(scores, truth),
        "recall_by_set": {},
    }
    for fact_set in synthetic.SETS:
        in_set = [i for i, row in enumerate(rows) if row["fact_set"] == fact_set and truth[i]]
        result["recall_by_set"][fact_set] = (
            sum(is_flagged[i] for i in in_set) / len(in_set) if in_set else None
        )
    return result


def render(results: list[dict[str, Any]], command: str, runtime_s: float, seeds: int) -> str:
    lines = [
        "# Suspect pairs: does `mrpo inspect` find wrongly labelled pairs?",
        "",
        f"Command: `{command}` ({runtime_s / 60:.1f} min on 2 CPU cores). Written by `experiments/suspect_audit.py`.",
        "",
        "The synthetic world of [results-synthetic.md](results-synthetic.md): facts of sets A, B, C; `model_A` "
        "(the policy's start, the initialising reference) knows A, `model_B` knows B, `model_AB` both, nobody C. "
        f"Per seed ({seeds} seeds, a new world each) one pair per fact (108: the true value against another value "
        "of the relation), a share of the labels flipped in each set. The references score the pairs through "
        "the pipeline's cache, and `audit.find_suspects` (threshold 1: every reference of a group contradicts the "
        "label by at least its median margin) flags them. *Precision* = flagged pairs that are truly flipped; "
        "*recall* = flipped pairs that are flagged; *R-precision* = precision among the top-|flipped| of the "
        "ranking; a random ranking scores the flip rate on both precisions.",
        "",
        "Mean ± 95% t-interval over seeds, in %:",
        "",
    ]
    rows = []
    for name in REFERENCE_SETS:
        for rate in NOISE_RATES:
            cell = [r for r in results if r["references"] == name and r["rate"] == rate]
            if not cell:
                continue

            def summary(values):
                mean, half, _ = stats.mean_ci([v for v in values if v is not None])
                return stats.interval_text(mean, half, signed=False)

            precision = [r["caught"] / r["flagged"] if r["flagged"] else None for r in cell]
            rows.append(
                [
                    name,
                    f"{rate:.0%}",
                    f"{sum(r['flagged'] for r in cell) / len(cell):.1f}",
                    summary(precision),
                    summary([r["caught"] / r["flipped"] for r in cell]),
                    summary([r["r_precision"] for r in cell]),
                    f"{100 * rate:.1f}",
                    *(summary([r["recall_by_set"][s] for r in cell]) for s in synthetic.SETS),
                ]
            )
    lines += markdown_table(
        ["references", "flipped", "flagged per seed", "precision", "recall", "R-precision", "random",
         "recall on A", "recall on B", "recall on C"],
        rows,
    )  # fmt: skip
    lines += [
        "",
        "Reading: a pair is caught only when the references that judge it know its fact. With `model_B` as the "
        "only external reference, flips in set B are found; flips in A (which `model_B` does not know) and in C "
        "(nobody knows) are not, whatever the threshold. Flags are candidates for review, not labels to trust "
        "blindly: precision falls where a reference is confidently wrong.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--output-dir", default="runs/suspect-audit")
    parser.add_argument("--docs", default="docs/results-suspects.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    output = Path(args.output_dir)
    settings = synthetic.WorldSettings()
    results = []
    for seed in range(args.seeds):
        world, info = synthetic.prepare_seed(seed, output / f"seed{seed}", settings)
        models = {name: info[name]["path"] for name in synthetic.MODELS}
        pairs = all_fact_pairs(world, seed)
        for rate in NOISE_RATES:
            rows = flip(pairs, rate, seed)
            for name, references in REFERENCE_SETS.items():
                work = output / f"seed{seed}" / "audit" / f"{rate:g}-{name.replace(' ', '')}"
                result = audit_one(models, rows, references, work)
                results.append({"seed": seed, "rate": rate, "references": name, **result})
        print(f"seed {seed}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    (output / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    command = " ".join(
        [".venv/bin/python experiments/suspect_audit.py", *(argv if argv is not None else sys.argv[1:])]
    )
    Path(args.docs).write_text(render(results, command, time.perf_counter() - started, args.seeds) + "\n")
    print(f"report: {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
