"""How much of the paper's reported gain can its metric make with no training at all? (issue 22, item 5)

The authors' K = 2 code feeds the policy's token ids to every reference, also to one of another family, and reports
TRL's ``rewards/accuracies``: reward accuracy against the virtual reference, which adaptive CTRO builds knowing which
answer is the chosen one. shared/mrpo-spec.md §9 predicts that a reference fed another model's ids scores garbage
whose log-prob scales with length, CTRO clips it to ``(1 + eps_y) l_1(y)`` with the larger eps on the longer answer,
and the metric at step 0 (policy = start, nothing learned) approaches the share of pairs whose chosen answer is longer.

This measures it on real HH-RLHF harmless pairs: 200 long, length-varied pairs, 65% with the longer answer chosen.
Policy and initialising reference SmolLM2-135M-Instruct; external Gemma-3-270M scored (i) on its own tokenization
(our default) and (ii) on the policy's token ids (``references[].tokens: policy``, the reproduction switch).

    .venv/bin/python experiments/paper_metric.py --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz

Writes ``--output-dir`` (default runs/paper-metric): the selected pairs, the config, ``result.json``; and the report
``docs/results-paper-metric.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

PAIRS = 200
CHOSEN_LONGER = 0.65
MIN_LONGEST = 300
"""Characters of the longer final answer: 'long' pairs."""
MIN_GAP = 0.2
"""The answers' lengths differ by at least this share of the longer one: 'length-varied' pairs."""
MAX_TRANSCRIPT = 2000
"""Characters of a whole transcript, to stay within max_length for every model."""


def final_answer(transcript: str) -> str:
    return transcript.rsplit("\n\nAssistant:", 1)[-1]


def select_pairs(rows: list[dict], seed: int = 0) -> list[dict]:
    """PAIRS rows, CHOSEN_LONGER of them with the longer final answer chosen, by the rules above."""
    longer, shorter = [], []
    for row in rows:
        chosen, rejected = len(final_answer(row["chosen"])), len(final_answer(row["rejected"]))
        longest = max(chosen, rejected)
        if longest < MIN_LONGEST or abs(chosen - rejected) < MIN_GAP * longest:
            continue
        if max(len(row["chosen"]), len(row["rejected"])) > MAX_TRANSCRIPT:
            continue
        (longer if chosen > rejected else shorter).append(row)
    rng = random.Random(f"paper-metric-{seed}")
    want_longer = round(CHOSEN_LONGER * PAIRS)
    if len(longer) < want_longer or len(shorter) < PAIRS - want_longer:
        raise SystemExit(f"not enough pairs: {len(longer)} chosen-longer and {len(shorter)} chosen-shorter")
    picked = rng.sample(longer, want_longer) + rng.sample(shorter, PAIRS - want_longer)
    rng.shuffle(picked)
    return [{"chosen": row["chosen"], "rejected": row["rejected"]} for row in picked]


def measure(config, names: list[str]) -> dict[str, Any]:
    """Step-0 metrics from the cached columns: the policy is its start, so its log-probs are reference 1's."""
    import dataclasses

    from mrpo.config.schema import LossConfig
    from mrpo.evaluation import compute_metrics
    from mrpo.prepared_split import prepare_split

    prepared = prepare_split(config, "train", show_progress=False)
    chosen, rejected = prepared.dataset.reference_chosen_logps, prepared.dataset.reference_rejected_logps
    start_w, start_l = chosen[0], rejected[0]
    ones = start_w.new_ones(
        start_w.shape
    )  # token counts: only the per-token rate uses them, and it is not read
    result: dict[str, Any] = {"pairs": int(chosen.shape[1])}
    for row, name in enumerate(names):
        margin = chosen[row] - rejected[row]
        result[f"{name}/label_agreement"] = float((margin > 0).double().mean())
        result[f"{name}/mean_logp"] = float(((chosen[row] + rejected[row]) / 2).double().mean())
    for row, name in enumerate(names[1:], start=1):
        for label, loss in (("paper defaults", LossConfig()), ("no CTRO", LossConfig(clip="off"))):
            metrics = compute_metrics(
                start_w, start_l, ones, ones, chosen[[0, row]], rejected[[0, row]], loss
            )
            key = f"{name}/{label}"
            result[f"{key}/reward_accuracy_virtual"] = metrics["reward_accuracy_virtual"]
            result[f"{key}/clip_rate"] = metrics["clip_rate"]
            result[f"{key}/loss"] = dataclasses.asdict(loss)
    return result


def render(result: dict[str, Any], chosen_longer: float, command: str, seconds: float) -> str:
    rows = []
    for name, what in (
        ("gemma_own", "its own tokenization (default)"),
        ("gemma_policy_ids", "the policy's token ids"),
    ):
        for label in ("paper defaults", "no CTRO"):
            key = f"{name}/{label}"
            rows.append(
                f"| Gemma-3-270M on {what} | {label} | {result[f'{key}/reward_accuracy_virtual']:.1%} | "
                f"{result[f'{key}/clip_rate']:.0%} | {result[f'{name}/label_agreement']:.1%} | "
                f"{result[f'{name}/mean_logp']:.0f} |"
            )
    own = result["gemma_own/paper defaults/reward_accuracy_virtual"]
    ids = result["gemma_policy_ids/paper defaults/reward_accuracy_virtual"]
    return "\n".join(
        [
            "# The paper's metric at step 0, with no training",
            "",
            "Written by `experiments/paper_metric.py` (issue 22, item 5; the prediction is shared/mrpo-spec.md §9).",
            f"{result['pairs']} real HH-RLHF harmless-base test pairs, long (the longer final answer >= {MIN_LONGEST}"
            f" characters) and length-varied (the answers differ by >= {MIN_GAP:.0%}), {chosen_longer:.0%} with the "
            "longer answer chosen. Policy = initialising reference = SmolLM2-135M-Instruct, untrained; K = 2 with "
            "Gemma-3-270M. Reward accuracy against the virtual reference is TRL's `rewards/accuracies`, the metric "
            "the paper reports; at step 0 the policy is its start, so any accuracy above 0 comes from the reference "
            "side alone (against the start it is 0% by construction: every reward margin is 0).",
            "",
            "| external reference scores | loss | reward acc. vs virtual ref, step 0 | clip rate | its label agreement"
            " | its mean log-prob (nats) |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"Initialising reference's own label agreement: {result['init/label_agreement']:.1%}; share of pairs with "
            f"the longer answer chosen: {chosen_longer:.1%}.",
            "",
            f"**Result:** with the authors' tokenization the paper's metric reads {ids:.1%} before any training step "
            f"({own:.1%} with each reference on its own tokenization), against {chosen_longer:.1%} of pairs whose "
            "chosen answer is longer. "
            + (
                "It approaches P(chosen longer): the metric measures the answers' lengths, not learning."
                if abs(ids - chosen_longer) < 0.1
                else "It does not approach P(chosen longer) here."
            ),
            "",
            f"Ran as `{command}` ({seconds / 60:.1f} min on this 2-core CPU).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="HH-RLHF .jsonl or .jsonl.gz (raw transcripts)")
    parser.add_argument("--output-dir", default="runs/paper-metric")
    parser.add_argument("--cache-dir", default=None, help="models + reference cache (default $MRPO_CACHE)")
    parser.add_argument("--docs", default="docs/results-paper-metric.md")
    args = parser.parse_args(argv)

    from mrpo.demo.config import run_config
    from mrpo.demo.models import GEMMA3, SMOLLM2, default_cache_dir, ensure_demo_model
    from mrpo.demo.pairs import write_jsonl

    begin = time.perf_counter()
    cache_root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    smollm2, gemma = str(ensure_demo_model(SMOLLM2, cache_root)), str(ensure_demo_model(GEMMA3, cache_root))
    opener = gzip.open if args.data.endswith(".gz") else open
    with opener(args.data, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    picked = select_pairs(rows)
    output = Path(args.output_dir)
    data = write_jsonl(output / "pairs.jsonl", picked)
    chosen_longer = sum(
        len(final_answer(r["chosen"])) > len(final_answer(r["rejected"])) for r in picked
    ) / len(picked)
    names = ["init", "gemma_own", "gemma_policy_ids"]
    config = run_config(
        policy=smollm2,
        references={"init": smollm2, "gemma_own": gemma, "gemma_policy_ids": gemma},
        train=data,
        output_dir=output / "run",
        cache_dir=cache_root / "references",
        data={"max_length": 1024},
    )
    import dataclasses

    references = list(config.references)
    references[2] = dataclasses.replace(references[2], tokens="policy")
    config = dataclasses.replace(config, references=references)
    result = measure(config, names)
    result["chosen_longer"] = chosen_longer
    (output / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - begin
    command = " ".join([".venv/bin/python experiments/paper_metric.py", *(argv or sys.argv[1:])])
    Path(args.docs).write_text(render(result, chosen_longer, command, seconds) + "\n", encoding="utf-8")
    print(Path(args.docs).read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
