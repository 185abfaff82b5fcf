"""Study, round two (issue 12): can MRPO help when labels are noisy and training does not saturate?

Policy SmolLM2-135M-Instruct; references SmolLM2 itself (initialising) and Gemma-3-270M (external). Per seed,
64 facts are drawn from a train pool (``reworded_facts``) and 30% of their labels flipped; every arm of that seed
trains on the same facts, flips, LoRA initialisation and training seed. Two held-out families:

- **reworded**: the seed's own training facts asked in two other wordings, with their *true* labels: what training
  taught about a fact, wrong labels included, transfers there;
- **disjoint**: the 95 facts outside the train pool, in the training wording (the first study's kind of test).

Arms (issue 12's letters): (a) DPO; (b) MRPO defaults; (c) MRPO without CTRO; (d) DPO on the pairs the external
reference agrees with; (e) DPO on the truly clean pairs (the oracle of any reweighting); (f) DPO on the pairs
``mrpo inspect`` does not flag; (g) MRPO with align=pair; (h) fixed alpha (external weight 0.25 / 0.5 / 0.75,
clipping off, against (c)'s adaptive alpha). A divergence arm trains on 125-187-token answers against a random
reference thousands of nats away, with and without CTRO; the lm-eval bridge scores start, DPO and MRPO.

    .venv/bin/python experiments/noisy_study.py --quick           # 1 seed, 6 runs, no divergence/lm-eval (~15 min)
    .venv/bin/python experiments/noisy_study.py --resume          # the full grid; finished runs are skipped

Layout of ``--output-dir`` (default ``runs/noisy-study``): ``settings.json``, ``data/``, one directory per run with
``result.json`` written last (atomically: a directory without it is redone), ``summary.json``. The report is
``docs/results-noisy-study.md`` with plots in ``docs/noisy-study/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import reworded_facts
import stats
from grid import RESULT_FILE, check_settings, read_jsonl, record_invocation, run_grid, write_json_atomic

from mrpo.demo.pairs import write_jsonl
from mrpo.report_tables import markdown_table

DECISION_RULE = (
    '"MRPO helps" if (b) or (c) beats (a) by >= 3 points of held-out policy accuracy with the 95% interval above 0; '
    '"MRPO wastes usable signal" if (d) beats (a) by >= 3 points while (b) and (c) stay near 0 (within ±1.5 '
    'points); "settled null at this scale" if even the oracle (e) beats (a) by < ~2 points. Judged per family '
    "(reworded, disjoint) and per beta at 30% flipped labels; the reworded family is the primary test only if (e) "
    "beats (a) there clearly (interval above 0), i.e. only if the test can discriminate at all."
)
"""Written into docs/results-noisy-study.md before the runs (issue 12) and quoted by the report."""

SATURATION_LOSS = 0.3
"""A run whose mean training loss over its last epoch is below this is flagged as saturated."""


@dataclass(frozen=True)
class Arm:
    letter: str
    references: tuple[str, ...]
    loss: dict[str, Any] = field(default_factory=dict)
    train_filter: str | None = None
    """None (all pairs), "external_agrees", "clean" or "not_flagged"."""
    description: str = ""


ARMS: dict[str, Arm] = {
    "dpo": Arm("a", ("init",), description="DPO (K = 1)"),
    "mrpo": Arm(
        "b", ("init", "external"), description="MRPO, paper defaults (adaptive alpha, adaptive CTRO 0.1)"
    ),
    "mrpo_no_ctro": Arm("c", ("init", "external"), {"clip": "off"}, description="MRPO without CTRO"),
    "dpo_external_agrees": Arm(
        "d", ("init",), train_filter="external_agrees", description="DPO on the pairs Gemma agrees with"
    ),
    "dpo_clean": Arm(
        "e", ("init",), train_filter="clean", description="DPO on the truly clean pairs (oracle)"
    ),
    "dpo_not_flagged": Arm(
        "f", ("init",), train_filter="not_flagged", description="DPO on the pairs mrpo inspect does not flag"
    ),
    "mrpo_align": Arm("g", ("init", "external"), {"align": "pair"}, description="MRPO, align=pair"),
    "mrpo_fixed_0.25": Arm(
        "h",
        ("init", "external"),
        {"clip": "off", "weights": [0.75, 0.25]},
        description="fixed alpha_ext 0.25",
    ),
    "mrpo_fixed_0.5": Arm(
        "h", ("init", "external"), {"clip": "off", "weights": [0.5, 0.5]}, description="fixed alpha_ext 0.5"
    ),
    "mrpo_fixed_0.75": Arm(
        "h",
        ("init", "external"),
        {"clip": "off", "weights": [0.25, 0.75]},
        description="fixed alpha_ext 0.75",
    ),
}

DIVERGENCE_ARMS: dict[str, Arm] = {
    "ctro_adaptive": Arm("div", ("init", "divergent"), description="random reference, adaptive CTRO 0.1"),
    "ctro_off": Arm("div", ("init", "divergent"), {"clip": "off"}, description="random reference, no CTRO"),
}

Cell = tuple[float, float, str]
"""(share of flipped labels, beta, arm)."""

PRIMARY_CELLS: tuple[Cell, ...] = (
    *(
        (0.3, 0.1, arm)
        for arm in ("dpo", "mrpo", "mrpo_no_ctro", "dpo_external_agrees", "dpo_clean", "dpo_not_flagged")
    ),
    *((0.3, 0.5, arm) for arm in ("dpo", "mrpo", "mrpo_no_ctro", "dpo_clean")),
)
"""Run on every seed: the arms the decision rule needs, at both betas ((d) and (f) at beta 0.1 only)."""
EXTRA_CELLS: tuple[Cell, ...] = (
    *((0.0, 0.1, arm) for arm in ("dpo", "mrpo", "mrpo_no_ctro")),
    (0.3, 0.1, "mrpo_align"),
    (0.3, 0.1, "mrpo_fixed_0.25"),
    (0.3, 0.1, "mrpo_fixed_0.5"),
    (0.3, 0.1, "mrpo_fixed_0.75"),
)
"""Lower priority (issue 12's order): clean labels for comparison, (g) and (h); on ``extra_seeds`` only."""


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...] = tuple(range(10))
    cells: tuple[Cell, ...] = PRIMARY_CELLS
    extra_cells: tuple[Cell, ...] = EXTRA_CELLS
    extra_seeds: tuple[int, ...] = (0, 1)
    """The lower-priority cells run on these seeds only, after the primary grid."""
    train_facts: int = 64
    epochs: float = 2.0
    batch_size: int = 4
    learning_rate: float = 1e-3
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    bf16: bool = True
    """bf16 autocast (fp32 master weights) for training and held-out scoring, as on a GPU."""
    max_length: int = 512
    divergence_seeds: tuple[int, ...] = (0, 1)
    divergence_pairs: int = 32
    lm_eval: bool = True
    lm_eval_limit: int = 100

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Settings:
        converted = {}
        for key, value in raw.items():
            if key in ("cells", "extra_cells"):
                value = tuple(tuple(cell) for cell in value)
            elif isinstance(value, list):
                value = tuple(value)
            converted[key] = value
        return cls(**converted)


QUICK = Settings(
    seeds=(0,),
    cells=(
        *((0.3, 0.1, arm) for arm in ("dpo", "mrpo", "mrpo_no_ctro", "dpo_clean")),
        *((0.3, 0.5, arm) for arm in ("dpo", "dpo_clean")),
    ),
    extra_cells=(),
    extra_seeds=(),
    divergence_seeds=(),
    lm_eval=False,
)


@dataclass(frozen=True)
class RunSpec:
    group: str
    """"start", "main", "divergence" or "lm_eval"."""
    arm: str
    seed: int
    noise: float = 0.0
    beta: float = 0.1

    @property
    def name(self) -> str:
        if self.group == "start":
            return f"start/s{self.seed}"
        if self.group == "divergence":
            return f"divergence/{self.arm}/s{self.seed}"
        if self.group == "lm_eval":
            return f"lm_eval/{self.arm}"
        return f"noise{self.noise:g}/beta{self.beta:g}/{self.arm}/s{self.seed}"


def expand_grid(settings: Settings) -> list[RunSpec]:
    """Seed by seed (so a cut grid still holds complete paired sets), the arms in priority order; then the extra
    arms, the divergence arm and the lm-eval runs."""
    runs: list[RunSpec] = []
    for seed in settings.seeds:
        runs.append(RunSpec("start", "start", seed))
        runs += [RunSpec("main", arm, seed, noise, beta) for noise, beta, arm in settings.cells]
    for seed in settings.extra_seeds:
        runs += [RunSpec("main", arm, seed, noise, beta) for noise, beta, arm in settings.extra_cells]
    for seed in settings.divergence_seeds:
        runs += [RunSpec("divergence", arm, seed, 0.0, 0.1) for arm in DIVERGENCE_ARMS]
    if settings.lm_eval and settings.seeds:
        runs += [RunSpec("lm_eval", label, settings.seeds[0], 0.3, 0.1) for label in ("start", "dpo", "mrpo")]
    return runs


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------


def seed_data(settings: Settings, data_dir: Path, seed: int) -> dict[str, Path]:
    """The seed's training facts (wording 0) at each noise level, and its reworded test (wordings 1 and 2)."""
    facts = reworded_facts.all_facts()
    pool, _ = reworded_facts.split_facts(facts)
    rng = random.Random(f"noisy-study-facts-{seed}")
    chosen = reworded_facts.sample_stratified(pool, settings.train_facts, rng)
    directory = data_dir / f"s{seed}"
    paths = {}
    noises = sorted({noise for noise, _, _ in (*settings.cells, *settings.extra_cells)})
    for noise in noises:
        flips = set(
            random.Random(f"noisy-study-flips-{seed}-{noise}").sample(
                range(len(chosen)), round(noise * len(chosen))
            )
        )
        records = [fact.pair(0, flipped=index in flips) for index, fact in enumerate(chosen)]
        paths[f"train-{noise:g}"] = write_jsonl(directory / f"train-noise{noise:g}.jsonl", records)
    reworded = [fact.pair(wording) for fact in chosen for wording in range(1, reworded_facts.WORDINGS)]
    paths["reworded"] = write_jsonl(directory / "reworded.jsonl", reworded)
    return paths


def disjoint_data(settings: Settings, data_dir: Path) -> Path:
    _, disjoint = reworded_facts.split_facts(reworded_facts.all_facts())
    return write_jsonl(data_dir / "disjoint.jsonl", [fact.pair(0) for fact in disjoint])


def divergence_data(settings: Settings, data_dir: Path) -> Path:
    """Long answers: the capitals of 26-32 countries as a list, the rejected list with four wrong capitals and
    four lines more or fewer (so a reference that scores every token alike puts hundreds of nats between them)."""
    from mrpo.demo.pairs import CAPITALS

    rng = random.Random("noisy-study-divergence")
    records = []
    for index in range(settings.divergence_pairs):
        countries = rng.sample(CAPITALS, rng.randint(26, 32))
        asked = countries[:-4] if index % 2 else countries
        lines = [f"- {country}: {capital}" for country, capital, _, _ in asked]
        wrong = list(lines)
        for position in rng.sample(range(len(asked)), 4):
            country, capital, continent, _ = asked[position]
            other = rng.choice([c for _, c, where, _ in CAPITALS if where == continent and c != capital])
            wrong[position] = f"- {country}: {other}"
        # Even pairs: the rejected list drops four countries; odd pairs: it adds four that were not asked for.
        wrong = wrong[:-4] if index % 2 == 0 else wrong + [f"- {c}: {k}" for c, k, _, _ in countries[-4:]]
        question = (
            "List the capital of each of these countries, one per line: "
            + ", ".join(c for c, *_ in asked)
            + "."
        )
        records.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": "Here are the capitals:\n" + "\n".join(lines)}],
                "rejected": [{"role": "assistant", "content": "Here are the capitals:\n" + "\n".join(wrong)}],
                "kind": "capital lists",
            }
        )
    return write_jsonl(data_dir / "divergence.jsonl", records)


# ------------------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------------------


class Runner:
    """Trains with ``mrpo.pipeline.run_train`` and scores the final adapter on the seed's two held-out sets."""

    def __init__(self, settings: Settings, output_dir: Path, cache_root: Path, models: dict[str, str]):
        self.settings = settings
        self.output_dir = output_dir
        self.cache_root = cache_root
        self.models = models
        self.data_dir = output_dir / "data"
        self._prepared: dict[str, Any] = {}

    def config(
        self,
        run: RunSpec,
        run_dir: Path,
        train: Path,
        *,
        references: Sequence[str],
        evaluation: Path | None = None,
    ):
        from mrpo.demo.config import run_config

        s = self.settings
        arm = (DIVERGENCE_ARMS if run.group == "divergence" else ARMS).get(run.arm)
        return run_config(
            policy=self.models["init"],
            references={name: self.models[name] for name in references},
            train=train,
            eval=evaluation,
            output_dir=run_dir,
            cache_dir=self.cache_root / "references",
            data={"max_length": s.max_length, "seed": run.seed},
            loss={"beta": run.beta, **(arm.loss if arm and evaluation is None else {})},
            lora={"enabled": True, "r": s.lora_r, "alpha": 2 * s.lora_r, "dropout": 0.0,
                  "target_modules": list(s.lora_targets)},
            training={"per_device_train_batch_size": s.batch_size, "num_train_epochs": s.epochs,
                      "learning_rate": s.learning_rate, "seed": run.seed, "bf16": s.bf16},
        )  # fmt: skip

    # -- data per seed --------------------------------------------------------------------------------------

    def train_file(self, run: RunSpec) -> Path:
        """The run's training pairs: the seed's noisy facts, filtered for arms (d), (e), (f)."""
        base = self.data_dir / f"s{run.seed}" / f"train-noise{run.noise:g}.jsonl"
        arm = ARMS[run.arm]
        if arm.train_filter is None:
            return base
        filtered = base.with_name(f"{base.stem}-{arm.train_filter}.jsonl")
        if not filtered.exists():
            records = read_jsonl(base)
            keep = self.keep_mask(run, base, records, arm.train_filter)
            write_jsonl(filtered, [record for record, kept in zip(records, keep, strict=True) if kept])
        return filtered

    def keep_mask(self, run: RunSpec, base: Path, records: list[dict], train_filter: str) -> list[bool]:
        if train_filter == "clean":
            return [not record["flipped"] for record in records]
        from mrpo.audit_suspects import find_suspects
        from mrpo.prepared_split import prepare_split

        config = self.config(run, self.output_dir / "scratch", base, references=("init", "external"))
        prepared = prepare_split(config, "train", show_progress=False)
        if len(prepared.tokenization.pair_ids) != len(records):
            raise RuntimeError(f"{base}: tokenization dropped pairs; raise max_length")
        chosen = prepared.dataset.reference_chosen_logps
        rejected = prepared.dataset.reference_rejected_logps
        margins = chosen.double() - rejected.double()
        if train_filter == "external_agrees":
            return (margins[1] > 0).tolist()
        flagged = {
            s.pair_id for s in find_suspects(margins, ["init", "external"], prepared.tokenization.pair_ids)
        }
        return [pair_id not in flagged for pair_id in prepared.tokenization.pair_ids]

    def prepared(self, key: str, data: Path):
        """A held-out split with the initialising reference's column (tokenized and cached once)."""
        if key not in self._prepared:
            from mrpo.prepared_split import prepare_split

            config = self.config(
                RunSpec("start", "start", 0),
                self.output_dir / "scratch",
                data,
                references=("init",),
                evaluation=data,
            )
            self._prepared = {
                k: v for k, v in self._prepared.items() if k == "disjoint"
            }  # keep one seed at a time
            self._prepared[key] = (prepare_split(config, "eval", show_progress=False), config)
        return self._prepared[key]

    # -- one run --------------------------------------------------------------------------------------------

    def __call__(self, run: RunSpec, run_dir: Path) -> dict[str, Any]:
        if run.group == "lm_eval":
            return self.lm_eval(run, run_dir)
        if run.group == "divergence":
            return {"train": self.train(run, run_dir, self.data_dir / "divergence.jsonl")}
        checkpoint, train = None, {}
        if run.group == "main":
            train = self.train(run, run_dir, self.train_file(run))
            checkpoint = train.pop("checkpoint")
        return {"train": train, "eval": self.evaluate(run, checkpoint)}

    def train(self, run: RunSpec, run_dir: Path, train_file: Path) -> dict[str, Any]:
        from mrpo.pipeline import run_train

        arm = (DIVERGENCE_ARMS if run.group == "divergence" else ARMS)[run.arm]
        config = self.config(run, run_dir, train_file, references=arm.references)
        begin = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_train(config, show_progress=False)
        records = read_jsonl(train_file)
        statistics = training_statistics(result.metrics_file)
        statistics.update(
            seconds=round(time.perf_counter() - begin, 1),
            pairs=len(records),
            flipped=sum(bool(r.get("flipped")) for r in records),
            checkpoint=str(result.final_model_dir),
        )
        return statistics

    def evaluate(self, run: RunSpec, checkpoint: str | None) -> dict[str, Any]:
        """Policy metrics on both held-out families; on the reworded one also split by whether the fact's training
        label is flipped at 30% noise (for every run of the seed, so the arms compare on the same facts)."""
        import torch

        from mrpo.evaluation import score_split, split_metrics
        from mrpo.models import load_for_evaluation

        begin = time.perf_counter()
        sets = {
            "reworded": self.prepared(
                f"reworded-s{run.seed}", self.data_dir / f"s{run.seed}" / "reworded.jsonl"
            ),
            "disjoint": self.prepared("disjoint", self.data_dir / "disjoint.jsonl"),
        }
        _, any_config = sets["disjoint"]
        model = load_for_evaluation(any_config, checkpoint, torch.device("cpu"))
        results: dict[str, Any] = {}
        # Scored under bf16 autocast like the training (1.7x faster here; on the start model's 223 held-out pairs it
        # changed no pair's preference, with sums within 0.5 nats of fp32).
        precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.settings.bf16)
        for family, (prepared, config) in sets.items():
            with precision:
                logps, tokens = score_split(model, prepared, run.arm, show_progress=False)
            held_out = split_metrics(run.arm, checkpoint or "start", prepared, config.loss, logps, tokens)
            results[family] = {
                "pairs": held_out.pairs,
                "metrics": held_out.metrics,
                "by_kind": held_out.by_kind,
            }
            if family == "reworded":
                results[family]["by_label"] = self.accuracy_by_flip(run.seed, prepared, logps)
        del model
        results["seconds"] = round(time.perf_counter() - begin, 1)
        return results

    def accuracy_by_flip(self, seed: int, prepared, logps) -> dict[str, dict[str, float]]:
        """Policy accuracy on the reworded pairs of the facts whose label is flipped at 30% noise, and of the rest."""
        noisy = self.data_dir / f"s{seed}" / "train-noise0.3.jsonl"
        if not noisy.exists():
            return {}
        flipped = {record["fact"] for record in read_jsonl(noisy) if record["flipped"]}
        fact_of = {pair.pair_id: pair.metadata.get("fact") for pair in prepared.text_pairs()}
        correct = (logps[:, 0] > logps[:, 1]).tolist()
        groups: dict[str, list[bool]] = {"flipped_facts": [], "clean_facts": []}
        for pair_id, right in zip(prepared.tokenization.pair_ids, correct, strict=True):
            groups["flipped_facts" if fact_of[pair_id] in flipped else "clean_facts"].append(right)
        return {
            name: {"policy_accuracy": sum(values) / len(values), "pairs": len(values)}
            for name, values in groups.items()
            if values
        }

    def lm_eval(self, run: RunSpec, run_dir: Path) -> dict[str, Any]:
        from mrpo.lm_eval_bridge import run_lm_eval

        checkpoint = None
        if run.arm != "start":
            source = self.output_dir / RunSpec("main", run.arm, run.seed, run.noise, run.beta).name / "final"
            checkpoint = str(source)
        config = self.config(run, run_dir, self.data_dir / "disjoint.jsonl", references=("init",))
        begin = time.perf_counter()
        result = run_lm_eval(
            config,
            checkpoint,
            ["mrpo_arithmetic", "mrpo_facts"],
            label=run.arm,
            limit=self.settings.lm_eval_limit,
        )
        return {
            "lm_eval": result.metrics,
            "samples": result.samples,
            "model": result.model,
            "seconds": round(time.perf_counter() - begin, 1),
        }


def training_statistics(metrics_file: Path) -> dict[str, Any]:
    """Loss curve, first / last-epoch / max loss, clip rate and final reward margin from a run's metrics."""
    rows = [row for row in read_jsonl(metrics_file) if "loss" in row] if metrics_file.exists() else []
    losses = [(row["step"], float(row["loss"])) for row in rows]
    last_epoch = (
        [
            loss
            for (_, loss), row in zip(losses, rows, strict=True)
            if row.get("epoch", 0) > rows[-1]["epoch"] - 1
        ]
        if rows
        else []
    )
    finite = [loss for _, loss in losses if math.isfinite(loss)]
    clip = [float(row["ctro/clip_rate"]) for row in rows if "ctro/clip_rate" in row]
    return {
        "loss_curve": losses,
        "first_loss": losses[0][1] if losses else math.nan,
        "last_epoch_loss": sum(last_epoch) / len(last_epoch) if last_epoch else math.nan,
        "max_loss": max(finite) if finite else math.nan,
        "nonfinite_steps": [step for step, loss in losses if not math.isfinite(loss)],
        "clip_rate": sum(clip) / len(clip) if clip else math.nan,
        "final_reward_margin": float(rows[-1].get("rewards/margins", math.nan)) if rows else math.nan,
    }


# ------------------------------------------------------------------------------------------------------------
# Report: docs/results-noisy-study.md and docs/noisy-study/*.png
# ------------------------------------------------------------------------------------------------------------

FAMILIES = ("reworded", "disjoint")


def accuracy(result: dict[str, Any], family: str) -> float:
    return result["eval"][family]["metrics"]["policy_accuracy"]


def main_results(results: Sequence[dict[str, Any]]) -> dict[Cell, dict[int, dict[str, Any]]]:
    """(noise, beta, arm) -> seed -> result, for the trained runs."""
    cells: dict[Cell, dict[int, dict[str, Any]]] = {}
    for result in results:
        if result["group"] == "main":
            cells.setdefault((result["noise"], result["beta"], result["arm"]), {})[result["seed"]] = result
    return cells


def difference(cells, cell: Cell, family: str) -> tuple[float, float, int]:
    """Mean and 95% t-interval of (arm - DPO) over the seeds both ran, in accuracy (0..1)."""
    noise, beta, _ = cell
    baseline = cells.get((noise, beta, "dpo"), {})
    values = {seed: accuracy(r, family) for seed, r in cells.get(cell, {}).items()}
    return stats.mean_ci(
        list(stats.paired(values, {s: accuracy(r, family) for s, r in baseline.items()}).values())
    )


def judge(cells, noise: float, beta: float, family: str) -> str:
    """The decision rule (DECISION_RULE) for one family and beta."""

    def diff(arm: str) -> tuple[float, float, int]:
        return difference(cells, (noise, beta, arm), family)

    oracle, filtered = diff("dpo_clean"), diff("dpo_external_agrees")
    mrpo, no_ctro = diff("mrpo"), diff("mrpo_no_ctro")
    if not math.isfinite(oracle[0]):
        return "not judged (the oracle arm did not run)"
    discriminates = math.isfinite(oracle[1]) and oracle[0] - oracle[1] > 0
    parts = [
        f"the oracle (e) is {stats.interval_text(*oracle[:2])} points from DPO "
        + ("(the test discriminates)" if discriminates else "(the test does not clearly discriminate)")
    ]
    helps = [name for name, d in (("(b)", mrpo), ("(c)", no_ctro)) if d[0] >= 0.03 and d[0] - d[1] > 0]
    near_zero = all(math.isfinite(d[0]) and abs(d[0]) <= 0.015 for d in (mrpo, no_ctro))
    if helps:
        verdict = f"**MRPO helps** ({' and '.join(helps)} beat DPO by >= 3 points, interval above 0)"
    elif math.isfinite(filtered[0]) and filtered[0] >= 0.03 and near_zero:
        verdict = "**MRPO wastes usable signal** ((d) beats DPO by >= 3 points while (b) and (c) stay near 0)"
    elif oracle[0] < 0.02:
        verdict = "**settled null at this scale** (even the oracle gains < 2 points)"
    else:
        verdict = "**inconclusive** under the rule (no branch of it applies)"
    return verdict + "; " + parts[0]


def filter_quality(cells, noise: float, beta: float, arm: str, train_facts: int) -> str:
    """Precision and recall of the pairs an arm dropped against the truly flipped ones, summed over seeds."""
    runs = cells.get((noise, beta, arm), {})
    flipped = round(noise * train_facts)
    dropped = sum(train_facts - r["train"]["pairs"] for r in runs.values())
    caught = sum(flipped - r["train"]["flipped"] for r in runs.values())
    total_flipped = flipped * len(runs)
    if not runs:
        return "–"
    precision = f"{caught / dropped:.0%}" if dropped else "–"
    recall = f"{caught / total_flipped:.0%}" if total_flipped else "–"
    return f"dropped {dropped / len(runs):.1f} pairs per seed; precision {precision}, recall {recall}"


def by_label(result: dict[str, Any], group: str) -> float:
    """Reworded accuracy on the facts whose training label is flipped at 30% noise ("flipped_facts"), or on the
    others ("clean_facts")."""
    return result["eval"]["reworded"].get("by_label", {}).get(group, {}).get("policy_accuracy", math.nan)


def flipped_fact_lines(cells, noise: float, beta: float) -> list[str]:
    """Where the difference lives: reworded accuracy on the facts trained with a flipped label and on the rest."""
    baseline = cells.get((noise, beta, "dpo"), {})
    rows = []
    for arm, spec in ARMS.items():
        runs = cells.get((noise, beta, arm))
        if not runs:
            continue
        row = [f"({spec.letter}) {arm}"]
        for group in ("flipped_facts", "clean_facts"):
            row.append(
                stats.interval_text(
                    *stats.mean_ci([by_label(r, group) for r in runs.values()])[:2], signed=False
                )
            )
            if arm != "dpo":
                differences = stats.paired(
                    {s: by_label(r, group) for s, r in runs.items()},
                    {s: by_label(r, group) for s, r in baseline.items()},
                )
                row.append(stats.interval_text(*stats.mean_ci(list(differences.values()))[:2]))
            else:
                row.append("baseline")
        rows.append(row)
    header = ["arm", "facts trained flipped", "Δ vs DPO", "facts trained clean", "Δ vs DPO"]
    return [
        "Reworded accuracy split by the facts' training labels (the 19 facts whose label is flipped, and the 45 "
        "others; the untrained start is in the setting above):",
        "",
        *markdown_table(header, rows),
    ]


def arm_rows(cells, noise: float, beta: float, settings: Settings) -> list[list[str]]:
    rows = []
    for arm, spec in ARMS.items():
        runs = cells.get((noise, beta, arm))
        if not runs:
            continue
        row = [f"({spec.letter}) {arm}", spec.description]
        for family in FAMILIES:
            mean, half, _ = stats.mean_ci([accuracy(r, family) for r in runs.values()])
            row.append(stats.interval_text(mean, half, signed=False))
            if arm == "dpo":
                row.append("baseline")
            else:
                d_mean, d_half, n = difference(cells, (noise, beta, arm), family)
                row.append(f"{stats.interval_text(d_mean, d_half)} ({n})")
        losses = [r["train"]["last_epoch_loss"] for r in runs.values()]
        saturated = sum(loss < SATURATION_LOSS for loss in losses)
        clip = [r["train"]["clip_rate"] for r in runs.values() if math.isfinite(r["train"]["clip_rate"])]
        row += [
            f"{sum(losses) / len(losses):.3f}" + (f" ({saturated} < {SATURATION_LOSS})" if saturated else ""),
            f"{sum(clip) / len(clip):.0%}" if clip and len(spec.references) > 1 else "–",
            str(len(runs)),
        ]
        rows.append(row)
    return rows


def render_markdown(
    results, settings: Settings, *, command: str, machine: str, runtime_s: float, plots: dict
) -> str:
    cells = main_results(results)
    starts = {r["seed"]: r for r in results if r["group"] == "start"}
    lines = ["# Study, round two: noisy labels, unsaturated training, ceilings", ""]
    lines += [
        "Written by `experiments/noisy_study.py` (issue 12). Question: with wrongly labelled training pairs and "
        "training that does not saturate, does MRPO beat DPO, and could any reweighting of the training pairs?",
        "",
        "## Decision rule (fixed before the runs)",
        "",
        f"> {DECISION_RULE}",
        "",
        "## Setting",
        "",
        f"- Policy SmolLM2-135M-Instruct, LoRA r {settings.lora_r} on {', '.join(settings.lora_targets)}, lr "
        f"{settings.learning_rate:g} constant, {settings.epochs:g} epochs of batch {settings.batch_size}, "
        f"{'bf16 autocast (fp32 weights) for training and scoring' if settings.bf16 else 'fp32'}, on the CPU.",
        "- References: SmolLM2-135M-Instruct (initialising) and Gemma-3-270M (external; another family and "
        "tokenizer), each scoring its own tokenization.",
        f"- Per seed: {settings.train_facts} facts drawn from a pool of {len(reworded_facts.split_facts(reworded_facts.all_facts())[0])}"
        " (capitals, chemical symbols, opposites, letter counts, unit conversions, arithmetic), asked in wording 0; "
        "at 30% noise 19 of their labels are flipped (swapped chosen / rejected). The same facts, flips, LoRA "
        "initialisation and training seed serve every arm of a seed.",
        f"- Held out: **reworded** -- the seed's {settings.train_facts} training facts in two other wordings "
        f"({2 * settings.train_facts} pairs, true labels); **disjoint** -- the "
        f"{len(reworded_facts.split_facts(reworded_facts.all_facts())[1])} facts outside the pool in wording 0. "
        "Metric: policy preference accuracy (pw > pl), which needs no reference.",
        f"- Seeds: {len(settings.seeds)} for the primary grid; the lower-priority cells on {len(settings.extra_seeds)}.",
        "",
    ]
    if starts:
        for group in ("flipped_facts", "clean_facts"):
            mean, half, n = stats.mean_ci([by_label(r, group) for r in starts.values()])
            lines.append(
                f"Untrained start, reworded, {group.replace('_', ' ')}: "
                f"{stats.interval_text(mean, half, signed=False)} % ({n} seeds).  "
            )
        for family in FAMILIES:
            mean, half, n = stats.mean_ci([accuracy(r, family) for r in starts.values()])
            lines.append(
                f"Untrained start, {family}: {stats.interval_text(mean, half, signed=False)} % ({n} seeds).  "
            )
        lines.append("")
    lines += ["## Verdict", ""]
    for noise, beta in sorted({(n, b) for n, b, _ in cells}, key=lambda c: (-c[0], c[1])):
        if (noise, beta, "dpo_clean") not in cells:
            continue
        for family in FAMILIES:
            lines.append(
                f"- {noise:.0%} flipped, beta {beta:g}, {family}: {judge(cells, noise, beta, family)}."
            )
    lines.append("")
    lines += [
        "## Per arm",
        "",
        "Held-out policy accuracy in % (mean ± 95% t-interval over seeds) and the paired difference to DPO in "
        "points (same seed, same facts and flips), with the number of seeds; the mean training loss over the last "
        f"epoch (runs below {SATURATION_LOSS} are flagged as saturated); the mean CTRO clip rate.",
        "",
    ]
    for noise, beta in sorted({(n, b) for n, b, _ in cells}, key=lambda c: (-c[0], c[1])):
        lines += [f"### {noise:.0%} flipped labels, beta {beta:g}", ""]
        lines += markdown_table(
            [
                "arm",
                "what",
                "reworded",
                "Δ vs DPO",
                "disjoint",
                "Δ vs DPO",
                "last-epoch loss",
                "clip",
                "seeds",
            ],
            arm_rows(cells, noise, beta, settings),
        )
        if noise > 0:
            lines += ["", *flipped_fact_lines(cells, noise, beta)]
        quality = [
            f"- ({ARMS[arm].letter}) {arm}: {filter_quality(cells, noise, beta, arm, settings.train_facts)}"
            for arm in ("dpo_external_agrees", "dpo_not_flagged")
            if (noise, beta, arm) in cells and noise > 0
        ]
        if quality:
            lines += ["", "Filters against the truly flipped pairs:", "", *quality]
        lines.append("")
    if plots.get("paired"):
        lines += [f"![paired differences]({plots['paired']})", ""]
    lines += divergence_section(results, plots)
    lines += lm_eval_section(results)
    lines += [
        "## What was cut, and how it ran",
        "",
        f"- The primary grid is (a)-(f) at beta 0.1 and (a), (b), (c), (e) at beta 0.5, 30% flipped, on "
        f"{len(settings.seeds)} seeds, sized to stay near 2.5 h on 2 CPU cores. Cut from it: (d) and (f) at beta 0.5. "
        f"Run on {len(settings.extra_seeds)} seeds only, after it: 0% flipped ((a)-(c)), (g) align=pair and (h) "
        "fixed alpha, all at beta 0.1.",
        "- Disclosed after the fact (issue 22): the learning rate 1e-3 was chosen after a seed-0 pilot (the oracle "
        "gap was 1.6 points at 5e-4 and 9.4 at 1e-3; commit c2b961c), not fixed before any result. The disjoint "
        "family is the same 95 pairs on every seed, so its interval covers training noise only, not the choice of "
        "test facts.",
        f"- Command: {command}",
        f"- Machine: {machine}",
        f"- Wall time of the runs in the summary: {sum(r.get('seconds', 0) for r in results) / 3600:.2f} h "
        f"(this invocation {runtime_s / 60:.1f} min).",
    ]
    return "\n".join(lines)


def divergence_section(results, plots) -> list[str]:
    runs = [r for r in results if r["group"] == "divergence"]
    if not runs:
        return []
    lines = [
        "## Divergence arm: can the loss blow up without CTRO?",
        "",
        "32 pairs whose answers are lists of 26-32 capitals (125-187 tokens of answer text under SmolLM2's "
        "tokenizer), the rejected list with four wrong capitals and four lines more or fewer; the external "
        "reference is a 2-layer random-init model with SmolLM2's tokenizer. Beta 0.1, the same LoRA settings.",
        "",
        "Without CTRO the loss starts high (9-11: the random reference's margin, unclipped, sits far from the "
        "start's) and decays; it cannot become infinite by construction: every input is a finite float32 sum of "
        "log-softmax values (`mrpo_loss` refuses a non-finite one with an error), and the loss is softplus(-z) of "
        "a finite z, at most |z| + log 2. A reported infinity needs a non-finite input, such as a half-precision "
        "overflow, which we refuse.",
        "",
    ]
    rows = [
        [r["arm"], str(r["seed"]), f"{r['train']['first_loss']:.2f}", f"{r['train']['max_loss']:.2f}",
         f"{r['train']['last_epoch_loss']:.2f}", str(len(r["train"]["nonfinite_steps"])),
         f"{r['train']['clip_rate']:.0%}" if math.isfinite(r["train"]["clip_rate"]) else "–"]
        for r in sorted(runs, key=lambda r: (r["arm"], r["seed"]))
    ]  # fmt: skip
    lines += markdown_table(
        ["arm", "seed", "first loss", "max loss", "last-epoch loss", "non-finite steps", "clip rate"], rows
    )
    if plots.get("divergence"):
        lines += ["", f"![divergence loss curves]({plots['divergence']})"]
    return lines + [""]


def lm_eval_section(results) -> list[str]:
    runs = [r for r in results if r["group"] == "lm_eval"]
    if not runs:
        return []
    lines = [
        "## General ability (lm-eval bridge, offline tasks)",
        "",
        "`mrpo_arithmetic` (generate the result, exact match) and `mrpo_facts` (capitals and chemical symbols, four "
        "choices): seed 0, 30% flipped labels, beta 0.1. These are two home-made tasks on one seed, and 22 of "
        "mrpo_facts' 84 questions ask a fact of seed 0's training set: the table says nothing about general "
        "ability (docs/results-teacher-study.md adds TruthfulQA-MC1).",
        "",
    ]
    rows = []
    for r in runs:
        for task, metrics in sorted(r["lm_eval"].items()):
            rows.append([r["arm"], task, ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items())),
                         str(r["samples"].get(task, ""))])  # fmt: skip
    return lines + markdown_table(["model", "task", "metrics", "n"], rows) + [""]


def write_plots(results, directory: Path, link_prefix: str) -> dict[str, str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    cells = main_results(results)
    plots = {}
    settings_cells = sorted({(n, b) for n, b, _ in cells}, key=lambda c: (-c[0], c[1]))
    if settings_cells:
        figure = Figure(figsize=(6 * len(FAMILIES), 1.2 + 0.35 * len(cells)), layout="constrained")
        FigureCanvasAgg(figure)
        for index, family in enumerate(FAMILIES):
            ax = figure.add_subplot(1, len(FAMILIES), index + 1)
            labels, y = [], 0
            for noise, beta in settings_cells:
                for arm in ARMS:
                    if arm == "dpo" or (noise, beta, arm) not in cells:
                        continue
                    base = {s: accuracy(r, family) for s, r in cells.get((noise, beta, "dpo"), {}).items()}
                    values = stats.paired(
                        {s: accuracy(r, family) for s, r in cells[(noise, beta, arm)].items()}, base
                    )
                    mean, half, _ = stats.mean_ci(list(values.values()))
                    ax.scatter(
                        [100 * v for v in values.values()], [y] * len(values), s=8, alpha=0.5, color="C0"
                    )
                    if math.isfinite(half):
                        ax.errorbar([100 * mean], [y], xerr=[100 * half], fmt="o", color="C3", capsize=3)
                    labels.append(f"{noise:.0%} b{beta:g} ({ARMS[arm].letter}) {arm}")
                    y += 1
            ax.axvline(0, color="grey", linewidth=1)
            ax.set_yticks(range(len(labels)), labels, fontsize="small")
            ax.invert_yaxis()
            ax.set_xlabel(f"{family}: accuracy - DPO (points)")
        figure.savefig(directory / "paired.png", dpi=100)
        plots["paired"] = f"{link_prefix}/paired.png"
    divergence = [r for r in results if r["group"] == "divergence"]
    if divergence:
        figure = Figure(figsize=(6, 4), layout="constrained")
        FigureCanvasAgg(figure)
        ax = figure.add_subplot(1, 1, 1)
        for r in sorted(divergence, key=lambda r: (r["arm"], r["seed"])):
            steps, losses = zip(*r["train"]["loss_curve"], strict=True)
            ax.plot(steps, losses, color="C0" if r["arm"] == "ctro_adaptive" else "C3", alpha=0.8,
                    label=f"{r['arm']} s{r['seed']}")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize="small")
        figure.savefig(directory / "divergence.png", dpi=100)
        plots["divergence"] = f"{link_prefix}/divergence.png"
    return plots


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 6 runs, no divergence / lm-eval (~15 min)"
    )
    parser.add_argument(
        "--output-dir", default=None, help="default runs/noisy-study (runs/noisy-study-quick with --quick)"
    )
    parser.add_argument("--resume", action="store_true", help="continue a study; finished runs are skipped")
    parser.add_argument("--cache-dir", default=None, help="models + reference cache (default $MRPO_CACHE)")
    parser.add_argument("--docs", default="docs/results-noisy-study.md", help="the markdown report to write")
    parser.add_argument(
        "--seeds", type=int, default=None, help="number of seeds (0..N-1) of the primary grid"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="render the report from finished runs only"
    )
    args = parser.parse_args(argv)

    from mrpo.demo.models import GEMMA3, SMOLLM2, default_cache_dir, ensure_demo_model

    started = time.perf_counter()
    settings = QUICK if args.quick else Settings()
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=tuple(range(args.seeds)))
    output_dir = Path(args.output_dir or ("runs/noisy-study-quick" if args.quick else "runs/noisy-study"))
    if args.report_only:
        settings = Settings.from_json(json.loads((output_dir / "settings.json").read_text(encoding="utf-8")))
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        check_settings(output_dir, settings, args.resume)
    cache_root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    models = {
        "init": str(ensure_demo_model(SMOLLM2, cache_root)),
        "external": str(ensure_demo_model(GEMMA3, cache_root)),
    }
    data_dir = output_dir / "data"
    for seed in sorted({*settings.seeds, *settings.extra_seeds}):
        seed_data(settings, data_dir, seed)
    disjoint_data(settings, data_dir)
    if settings.divergence_seeds:
        divergence_data(settings, data_dir)
        from study import make_divergent_reference

        models["divergent"] = str(
            make_divergent_reference(models["init"], output_dir / "models" / "divergent-tiny-llama")
        )
    runs = expand_grid(
        settings,
    )
    print(f"{len(runs)} runs; output {output_dir}", flush=True)
    runner = Runner(settings, output_dir, cache_root, models)
    lines: list[str] = []

    def log(message: str) -> None:
        lines.append(message)
        print(message, flush=True)

    if args.report_only:
        runs = [run for run in runs if (output_dir / run.name / RESULT_FILE).exists()]
    results = run_grid(runs, output_dir, runner, log=log)
    runtime = time.perf_counter() - started
    command = " ".join(
        [".venv/bin/python experiments/noisy_study.py", *(argv if argv is not None else sys.argv[1:])]
    )
    ran = sum(1 for line in lines if line.endswith(": running"))
    invocations = record_invocation(output_dir, command, runtime, ran)
    write_json_atomic(output_dir / "summary.json", {"settings": settings.to_json(), "results": results})
    commands = "; then ".join(
        f"`{item['command']}` ({item['runtime_s'] / 60:.1f} min, {item['runs_run']} runs run)"
        for item in [*(i for i in invocations[:-1] if i["runs_run"]), invocations[-1]]
    )
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    machine = (
        f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU; load average at the end "
        f"{load} (above {os.cpu_count()}: other work shared the cores)"
    )
    docs = Path(args.docs)
    plots = write_plots(results, docs.parent / "noisy-study", "noisy-study")
    docs.write_text(
        render_markdown(results, settings, command=commands, machine=machine, runtime_s=runtime, plots=plots)
        + "\n",
        encoding="utf-8",
    )
    print(f"report: {docs}\n{len(results)} results; runtime {runtime / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
