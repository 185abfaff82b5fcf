"""The report of the round-three study (``teacher_study.py``): docs/results-teacher-study.md, its plots and
``docs/teacher-study/summary.json`` (every run's result, so anyone can re-analyse)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import stats
import truthfulqa_students
from grid import write_json_atomic
from teacher_study import (
    ARMS,
    BASELINE,
    DECISION_RULE,
    Settings,
    random_control,
    teacher_beats_start,
    variant,
)

from mrpo.report_tables import markdown_table

FAMILIES = ("reworded", "disjoint")
GROUPS = ("known_flipped", "known_clean", "unknown_flipped", "unknown_clean")
MODEL_LABELS = {
    "init": "start (SmolLM2-135M-Instruct)",
    "t1": "t1 (SmolLM2 taught)",
    "t2": "t2 (Gemma-3-270M taught)",
    "gemma": "Gemma-3-270M as it is",
    "random": "random-init control",
}


def cells_of(results: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """arm -> seed -> result for the student runs; the untrained start under "start"."""
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for result in results:
        if result["group"] in ("main", "start"):
            cells.setdefault(result["arm"], {})[result["seed"]] = result
    return cells


def accuracy(result: dict[str, Any], family: str, group: str | None = None) -> float:
    metrics = result["eval"][family]
    if group is None:
        return metrics["policy_accuracy"]
    return metrics["by_group"].get(group, {}).get("policy_accuracy", math.nan)


def difference(cells, arm: str, baseline: str, family: str, group: str | None = None):
    """Mean and 95% t-interval of (arm - baseline) over the seeds both ran, in accuracy (0..1)."""
    values = {seed: accuracy(r, family, group) for seed, r in cells.get(arm, {}).items()}
    base = {seed: accuracy(r, family, group) for seed, r in cells.get(baseline, {}).items()}
    return stats.mean_ci(list(stats.paired(values, base).values()))


def above(d: tuple[float, float, int], threshold: float = 0.0) -> bool:
    mean, half, _ = d
    return math.isfinite(mean) and math.isfinite(half) and mean >= threshold and mean - half > 0


def judge(
    cells,
    probe: dict[str, Any],
    teacher: str,
    seeds_needed: int = 2,
    *,
    family: str = "reworded",
    gate=teacher_beats_start,
    gate_text: str = "on the teacher-known facts in the probe",
    suffix: str = "",
) -> str:
    """The decision rule (DECISION_RULE) for one teacher on ``family``, once DPO has finished ``seeds_needed`` seeds
    (the report asks for the whole primary grid); ``gate(probe, teacher)`` says whether the teacher beat the start
    before any student. ``suffix``: the arms of one variant only ("_ln": the length-normalised ones)."""
    dpo = "dpo" + suffix
    if probe and not gate(probe, teacher):  # refused before any student: its arms never run
        return f"**{teacher}: not judged** (it does not beat the start {gate_text})"
    if dpo not in cells:
        return f"**{teacher}: not judged yet** (no student run has finished)"
    if len(cells[dpo]) < seeds_needed:
        return f"**{teacher}: not judged yet** ({len(cells[dpo])} of {seeds_needed} seeds finished)"
    mrpo_arms = [
        arm
        for arm, spec in ARMS.items()
        if spec.letter in "bcd" and teacher in spec.references and variant(arm) == suffix
    ]
    helped = []
    for arm in mrpo_arms:
        if arm not in cells:
            continue
        versus_dpo = difference(cells, arm, BASELINE[arm], family)
        versus_random = difference(cells, arm, random_control(arm), family)
        if above(versus_dpo, 0.03) and above(versus_random):
            helped.append(f"({ARMS[arm].letter}) {arm}")
    if helped:
        return f"**{teacher}: a teacher helps through MRPO** ({', '.join(helped)})"
    single = f"dpo_ref_{teacher}{suffix}"
    if single in cells and above(difference(cells, single, dpo, family), 0.03):
        beaten = [arm for arm in mrpo_arms if arm in cells and above(difference(cells, arm, single, family))]
        if not beaten:
            return f"**{teacher}: only a better single reference helps** ((e) {single} beats DPO; no MRPO arm beats it)"
    return f"**{teacher}: null** (no branch of the rule applies)"


def versus_single_lines(cells, teachers: Sequence[str], family: str) -> list[str]:
    """Each MRPO arm with a teacher against DPO with that teacher as its only reference (e): what MRPO adds to the
    teacher itself."""
    lines = []
    for teacher in teachers:
        single = f"dpo_ref_{teacher}"
        arms = [arm for arm, spec in ARMS.items() if spec.letter in "bcd" and teacher in spec.references]
        parts = [
            f"({ARMS[arm].letter}) {arm} "
            + stats.interval_text(*difference(cells, arm, single + variant(arm), family)[:2])
            for arm in arms
            if arm in cells and single + variant(arm) in cells
        ]
        if parts:
            lines.append(
                f"- Against DPO with {teacher} as its only reference ({single}), in points on {family} (paired by "
                f"seed): {'; '.join(parts)}."
            )
    return [*lines, ""] if lines else []


def probe_lines(probe: dict[str, Any]) -> list[str]:
    header = [
        "model",
        "agrees (known)",
        "Δ vs start (known)",
        "agrees (unknown)",
        "Δ vs start (unknown)",
        "mean |margin| known / unknown",
        "beyond start (known)",
        "less confident than start",
    ]
    rows = []
    for name, entry in probe.get("probe", {}).items():
        known, unknown = entry.get("known", {}), entry.get("unknown", {})

        def delta(part: dict, name: str = name) -> str:
            if name == "init" or not part:
                return "–"
            d = part["vs_start"]
            return f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"

        rows.append(
            [
                MODEL_LABELS.get(name, name),
                f"{known.get('agreement', math.nan):.1%}",
                delta(known),
                f"{unknown.get('agreement', math.nan):.1%}",
                delta(unknown),
                f"{known.get('mean_abs_margin', math.nan):.2f} / {unknown.get('mean_abs_margin', math.nan):.2f}",
                "–" if name == "init" else f"{known.get('beyond_start', math.nan):.0%}",
                "–" if name == "init" else f"{entry.get('all', {}).get('less_confident', math.nan):.0%}",
            ]
        )
    disjoint = probe.get("disjoint", {})
    notes = [
        f"{MODEL_LABELS.get(n, n)} {e['all']['agreement']:.1%}" for n, e in disjoint.items() if "all" in e
    ]
    return [
        "Label agreement (margin d > 0) on the 191 pool facts in wording 0 with their true labels (the students'"
        " training items, before any flip), split by whether the teachers were trained on the fact (in other "
        "wordings); Δ: paired difference with the start in points, 95% normal interval over pairs. *Beyond start*:"
        " share of pairs with d > 0 and d larger than the start's (what a reference can add, spec §8).",
        "",
        *markdown_table(header, rows),
        "",
        "On the 95 disjoint facts (no model was taught them): " + "; ".join(notes) + ".",
    ]


def arm_rows(cells, families: Sequence[str] = FAMILIES) -> list[list[str]]:
    rows = []
    for arm, spec in ARMS.items():
        runs = cells.get(arm)
        if not runs:
            continue
        row = [f"({spec.letter}) {arm}", spec.description]
        for family in families:
            mean, half, _ = stats.mean_ci([accuracy(r, family) for r in runs.values()])
            row.append(stats.interval_text(mean, half, signed=False))
            if arm == BASELINE[arm]:
                row.append("baseline")
            else:
                d_mean, d_half, n = difference(cells, arm, BASELINE[arm], family)
                row.append(f"{stats.interval_text(d_mean, d_half)} ({n})")
        clip = [r["train"].get("clip_rate", math.nan) for r in runs.values()]
        clip = [c for c in clip if math.isfinite(c)]
        losses = [r["train"]["last_epoch_loss"] for r in runs.values()]
        row += [
            f"{sum(losses) / len(losses):.3f}",
            f"{sum(clip) / len(clip):.0%}" if clip and len(spec.references) > 1 else "–",
            str(len(runs)),
        ]
        rows.append(row)
    return rows


def group_rows(cells, family: str = "reworded", groups: Sequence[str] = GROUPS) -> list[list[str]]:
    rows = []
    for arm, spec in ARMS.items():
        if arm not in cells:
            continue
        row = [f"({spec.letter}) {arm}"]
        for group in groups:
            dpo = "dpo" + variant(arm)
            if arm == dpo:
                mean, half, _ = stats.mean_ci([accuracy(r, family, group) for r in cells[arm].values()])
                row.append(stats.interval_text(mean, half, signed=False))
            else:
                row.append(stats.interval_text(*difference(cells, arm, dpo, family, group)[:2]))
        rows.append(row)
    return rows


def paper_rows(cells, families: Sequence[str] = FAMILIES) -> list[list[str]]:
    rows = []
    for arm, spec in ARMS.items():
        runs = cells.get(arm)
        if not runs:
            continue
        row = [f"({spec.letter}) {arm}"]
        for family in families:
            for moment, key in (
                ("paper_metric_step0", "reward_accuracy_own_virtual"),
                ("paper_metric_trained", "reward_accuracy_own_virtual"),
                ("paper_metric_trained", "reward_accuracy_start"),
            ):
                values = [r["eval"][family][moment][key] for r in runs.values()]
                mean, half, _ = stats.mean_ci(values)
                row.append(stats.interval_text(mean, half, signed=False))
            row.append(f"{100 * next(iter(runs.values()))['eval'][family]['chosen_longer']:.0f}")
        rows.append(row)
    return rows


def write_plots(
    cells, directory: Path, families: Sequence[str] = FAMILIES, name: str = "teacher-study/paired.png"
) -> dict[str, str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    arms = [arm for arm in ARMS if arm in cells and arm != BASELINE[arm]]
    if not arms:
        return {}
    figure = Figure(figsize=(12, 1.2 + 0.35 * len(arms)), layout="constrained")
    FigureCanvasAgg(figure)
    for index, family in enumerate(families):
        ax = figure.add_subplot(1, len(families), index + 1)
        for y, arm in enumerate(arms):
            base = {s: accuracy(r, family) for s, r in cells.get(BASELINE[arm], {}).items()}
            values = stats.paired({s: accuracy(r, family) for s, r in cells[arm].items()}, base)
            mean, half, _ = stats.mean_ci(list(values.values()))
            ax.scatter([100 * v for v in values.values()], [y] * len(values), s=8, alpha=0.5, color="C0")
            if math.isfinite(half):
                ax.errorbar([100 * mean], [y], xerr=[100 * half], fmt="o", color="C3", capsize=3)
        ax.axvline(0, color="grey", linewidth=1)
        ax.axvline(3, color="grey", linewidth=1, linestyle=":")
        ax.set_yticks(range(len(arms)), [f"({ARMS[a].letter}) {a} vs {BASELINE[a]}" for a in arms])
        ax.invert_yaxis()
        ax.set_xlabel(f"{family}: policy accuracy - DPO (points; dots = seeds)")
    figure.savefig(directory / Path(name).name, dpi=100)
    return {"paired": name}


def level_lines(audit: dict[str, Any] | None) -> list[str]:
    """Where each reference's log-probs sit against the start's, and what CTRO keeps of them (``mrpo inspect`` on
    the probe pairs)."""
    if not audit:
        return []
    split = audit["splits"][0]
    parts = []
    for reference in split["references"][1:]:
        clip = reference.get("clip_alternatives") or {}
        parts.append(
            f"{MODEL_LABELS.get(reference['name'], reference['name'])} {reference['level_gap']:+.1f} nats, clipped "
            f"{clip.get('configured', math.nan):.0%} at the defaults, {clip.get('eps=2', math.nan):.0%} at eps 2, "
            f"{clip.get('align=pair', math.nan):.0%} with align=pair"
        )
    return [
        "",
        "Level of each reference's log-probs against the start's (mean over both answers, `mrpo inspect` on the probe "
        "pairs) and the share CTRO clips: "
        + "; ".join(parts)
        + ". A reference clipped everywhere reaches the loss "
        "only without CTRO (c) or as the single reference (e).",
    ]


def render(
    results,
    settings: Settings,
    *,
    commands: str,
    machine: str,
    plots: dict[str, str],
    audit: dict | None = None,
    truthfulqa: dict | None = None,
) -> str:
    cells = cells_of(results)
    probe = next((r for r in results if r["group"] == "probe"), {})
    teachers = {r["arm"]: r for r in results if r["group"] == "teacher"}
    lines = [
        "# Study, round three: teachers that know more than the start",
        "",
        "Written by `experiments/teacher_study.py` (issue 22). Question: a reference can only add what it knows "
        "beyond the policy's start (shared/mrpo-spec.md §8); given teachers that do know more, does MRPO turn that "
        "into held-out accuracy, better than DPO against the teacher alone?",
        "",
        "## Decision rule (fixed before the runs)",
        "",
        f"> {DECISION_RULE}",
        "",
        "## Verdict",
        "",
        *[f"- {judge(cells, probe, teacher, len(settings.seeds))}" for teacher in settings.teachers],
        "",
        *versus_single_lines(cells, settings.teachers, "reworded"),
        f"Seeds finished per arm: {', '.join(f'{arm} {len(runs)}' for arm, runs in cells.items())}.",
        "",
        "## The teachers, measured before any student",
        "",
    ]
    for name, teacher in teachers.items():
        lines.append(
            f"- {name}: {teacher['base']} DPO-trained on {teacher['pairs']} pairs in {teacher['seconds_train'] / 60:.1f}"
            f" min (last-epoch loss {teacher['train']['last_epoch_loss']:.3f}); "
            + (
                "beats the start: used."
                if teacher_beats_start(probe, name)
                else "does NOT beat the start: not judged."
            )
        )
    lines += [
        "",
        *probe_lines(probe),
        *level_lines(audit),
        "",
        "## Students: held-out policy preference accuracy",
        "",
    ]
    lines += [
        "Accuracy in %, mean ± 95% t-interval over seeds; Δ: paired difference with DPO at the same beta, in "
        "points (seeds). Clip: mean logged `ctro/clip_rate`.",
        "",
        *markdown_table(
            ["arm", "what", "reworded", "Δ", "disjoint", "Δ", "last-epoch loss", "clip", "seeds"],
            arm_rows(cells),
        ),
        "",
    ]
    if plots.get("paired"):
        lines += [f"![paired differences]({plots['paired']})", ""]
    lines += [
        "## Where it acts: teacher-known x flipped (reworded)",
        "",
        "DPO's accuracy, then each arm's paired difference with it, in the four groups of reworded pairs: facts the "
        "teachers were taught or not, whose training label was flipped or not.",
        "",
        *markdown_table(["arm", *GROUPS], group_rows(cells)),
        "",
        "## The paper's metric",
        "",
        "Reward accuracy against the run's own virtual reference (what TRL's `rewards/accuracies` reports; "
        "label-aware under adaptive CTRO) at step 0 (the untrained start) and after training, and against the start "
        "after training; next to the share of pairs whose chosen answer is longer (characters).",
        "",
        *markdown_table(
            [
                "arm",
                "reworded: own virtual, step 0",
                "trained",
                "vs start, trained",
                "chosen longer %",
                "disjoint: own virtual, step 0",
                "trained",
                "vs start, trained",
                "chosen longer %",
            ],
            paper_rows(cells),
        ),
        "",
        *truthfulqa_students.report_lines(truthfulqa, {arm: spec.description for arm, spec in ARMS.items()}),
        "## Setting",
        "",
        f"- Students: SmolLM2-135M-Instruct, LoRA r {settings.lora_r} on {', '.join(settings.lora_targets)}, lr "
        f"{settings.learning_rate:g} constant (round two's value, moved there from 1e-4 after a seed-0 pilot), "
        f"{settings.epochs:g} epochs of batch {settings.batch_size}, bf16 autocast, {settings.train_facts} facts per "
        f"seed with {round(settings.noise * settings.train_facts)} labels flipped.",
        f"- Teachers: LoRA r {settings.teacher_lora_r}, lr {settings.teacher_learning_rate:g}, beta "
        f"{settings.teacher_beta:g}, {settings.teacher_epochs:g} epochs, merged; {settings.known_fraction:.0%} of "
        "the pool facts, wordings 3 and 4 (experiments/reworded_facts.py).",
        "- Every setting here was fixed before any student ran; none was changed after a result.",
        "- Not in this page: the HH-RLHF family (its own runner and page, `experiments/hh_study.py`, "
        "docs/results-hh-study.md)"
        + ("" if truthfulqa else "; TruthfulQA-MC1 on the students (`experiments/truthfulqa_students.py`)")
        + ".",
        f"- The secondary arms ({', '.join(settings.secondary_arms)}) are planned on {len(settings.secondary_seeds)}"
        " seeds, after the primary grid; the seeds each arm finished are listed under the verdict.",
        f"- Ran as: {commands}. Machine: {machine}.",
        *reuse_lines(results),
        "- Every run's result: [teacher-study/summary.json](teacher-study/summary.json).",
    ]
    return "\n".join(lines) + "\n"


def ran_as(results, invocations: Sequence[dict], script: str) -> str:
    """How the grid ran: each invocation that ran to the end (recorded in invocations.jsonl) and, when they account
    for fewer runs than were done here, the invocations that were stopped and resumed before them."""
    ran = [i for i in invocations if i["runs_run"]]
    parts = [f"`{i['command']}` ({i['runtime_s'] / 60:.0f} min, {i['runs_run']} runs)" for i in ran]
    done_here = [r for r in results if not r.get("reused_from")]
    unrecorded = len(done_here) - sum(i["runs_run"] for i in ran)
    if unrecorded > 0:
        seconds = sum(r.get("seconds", 0.0) for r in done_here)
        parts.insert(
            0,
            f"{unrecorded} runs by `.venv/bin/python experiments/{script}.py --resume`, stopped and resumed (those "
            "invocations did not run to the end, so none is recorded)",
        )
        parts.append(
            f"the runs done here took {seconds / 3600:.1f} h in all (each run's `seconds` is in the summary)"
        )
    return "; ".join(parts) or "not run"


def reuse_lines(results) -> list[str]:
    """Say which runs were taken from a committed summary (``--reuse``) rather than run in this directory."""
    reused = [r for r in results if r.get("reused_from")]
    if not reused:
        return []
    seeds = sorted({r["seed"] for r in reused})
    return [
        f"- {len(reused)} runs (seeds {', '.join(map(str, seeds))}) were taken from an earlier machine's committed "
        "summary (`--reuse`), after the teachers rebuilt here equalled that machine's to the last digit (training "
        "statistics and every probe number); the rest ran here."
    ]


def write_report(
    results,
    settings: Settings,
    invocations: Sequence[dict],
    docs: Path,
    *,
    machine: str,
    audit: dict | None = None,
) -> None:
    """The page, its plots and ``summary.json``; ``invocations`` are the study's runs of the command so far,
    ``audit`` the probe's ``inspect.json``."""
    directory = docs.parent / "teacher-study"
    summary = [{k: v for k, v in r.items() if k != "loss_curve"} for r in results]
    write_json_atomic(directory / "summary.json", {"settings": settings.to_json(), "results": summary})
    commands = ran_as(results, invocations, "teacher_study")
    plots = write_plots(cells_of(results), directory)
    truthfulqa_file = directory / "truthfulqa.json"
    truthfulqa = json.loads(truthfulqa_file.read_text("utf-8")) if truthfulqa_file.exists() else None
    docs.write_text(
        render(
            results,
            settings,
            commands=commands,
            machine=machine,
            plots=plots,
            audit=audit,
            truthfulqa=truthfulqa,
        ),
        "utf-8",
    )
