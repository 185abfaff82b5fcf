"""Study, round three (issue 22): do references that know more than the start help, through MRPO?

Rounds one and two trained MRPO as DPO (within ±1 point): every reference tried knew less than the policy's start,
and a reference moves a pair only by how far its margin differs from the start's (shared/mrpo-spec.md §8). Here the
references are *teachers* that know more, built with the project's own commands and measured before any student:

- **t1**: SmolLM2-135M-Instruct (the students' start) DPO-trained with LoRA, merged, on clean pairs of half the pool
  facts (the *teacher-known* facts) asked in two wordings no student trains on and no test asks;
- **t2**: Gemma-3-270M trained the same way: larger and of another family, the paper's distillation direction;
- controls: **gemma** (Gemma-3-270M as it is: knows less) and **random** (a random-init 2-layer model: knows
  nothing).

Students: SmolLM2-135M-Instruct, LoRA, 64 pool facts per seed in wording 0 with 30% of the labels flipped; every arm
of a seed shares the facts, flips, LoRA initialisation and data order (round two's setting, lr 1e-3 included).
Held out: **reworded** (the seed's training facts in wordings 1 and 2, true labels; split by teacher-known x
flipped) and **disjoint** (the facts outside the pool, wording 0). Primary metric: policy preference accuracy
(pw > pl). Beside it the paper's metric: reward accuracy against the run's own virtual reference and against the
start, at step 0 and after training, next to the share of pairs whose chosen answer is longer.

    .venv/bin/python experiments/teacher_study.py --quick     # 1 seed, t1 only (1 teacher epoch), 3 arms (~15 min)
    .venv/bin/python experiments/teacher_study.py --resume    # the full grid; finished runs are skipped
    .venv/bin/python experiments/teacher_study.py --resume --reuse docs/teacher-study/summary.json

``--reuse`` takes the student results of a committed ``summary.json`` (another machine's run directory) once this
directory's teachers and probe are finished and equal the summary's to the last digit (training statistics, probe
numbers and, where the summary has them, the merged weights' SHA-256): the rebuilt teachers are then the same
models, and the grid continues where the summary stopped instead of running its seeds again.

Layout of ``--output-dir`` (default ``runs/teacher-study``): ``settings.json``, ``data/``, ``teachers/<name>/``
(each teacher's run, its merged model in ``merged/``), ``probe/`` (the teachers' knowledge, ``mrpo inspect``'s
output), ``models/random``, one directory per student run with ``result.json`` written last. The report is
``docs/results-teacher-study.md``, with ``docs/teacher-study/summary.json`` (every result) and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import reworded_facts
from grid import RESULT_FILE, check_settings, read_jsonl, record_invocation, run_grid, write_json_atomic
from noisy_study import Arm, training_statistics

from mrpo.demo.pairs import write_jsonl

DECISION_RULE = (
    'Judged on the reworded family, policy preference accuracy, paired by seed. "A teacher helps through MRPO" '
    "if (b), (c) or (d) with a teacher beats DPO (a) at the same beta by >= 3 points with the 95% interval above 0 "
    '*and* beats the same arm with the random control (interval above 0); "only a better single reference '
    'helps" if (e) with a teacher beats (a) by >= 3 points (interval above 0) while no MRPO arm with that teacher '
    'beats (e); "null" otherwise. A teacher whose label agreement on the teacher-known facts does not beat the '
    "start's (paired 95% interval above 0) before any student run is reported as such and its arms are not judged."
)
"""Written into docs/results-teacher-study.md before the runs (issue 22) and quoted by the report."""

MODEL_NAMES = ("init", "t1", "t2", "gemma", "random")
"""Every model a student run may use as a reference, in the order of the held-out reference columns."""
TEACHERS = ("t1", "t2")

BETA_LN = 3.0
"""beta of the length-normalised arms: DPO's 0.1 per summed nat times the median answer length in SmolLM2 tokens
of the HH-RLHF students' training pairs (29: the 640 answers of the five seeds' draws, tokenized as the policy
does), rounded; fixed before any length-normalised run."""

ARMS: dict[str, Arm] = {
    "dpo": Arm("a", ("init",), description="DPO (K = 1) against the start"),
    "oracle": Arm("g", ("init",), train_filter="clean", description="DPO on the truly clean pairs (oracle)"),
    "mrpo_t1": Arm("b", ("init", "t1"), description="MRPO defaults, teacher t1"),
    "mrpo_t2": Arm("b", ("init", "t2"), description="MRPO defaults, teacher t2"),
    "dpo_ref_t1": Arm("e", ("t1",), description="DPO against t1 alone"),
    "dpo_ref_t2": Arm("e", ("t2",), description="DPO against t2 alone"),
    "noctro_t1": Arm("c", ("init", "t1"), {"clip": "off"}, description="MRPO without CTRO, t1"),
    "noctro_t2": Arm("c", ("init", "t2"), {"clip": "off"}, description="MRPO without CTRO, t2"),
    "mrpo_random": Arm("b", ("init", "random"), description="MRPO defaults, random control"),
    "noctro_random": Arm("c", ("init", "random"), {"clip": "off"}, description="MRPO without CTRO, random"),
    "dpo_b0.5": Arm("a", ("init",), {"beta": 0.5}, description="DPO at beta 0.5"),
    "sharp_t1": Arm("d", ("init", "t1"), {"beta": 0.5, "eps": 1.0}, description="MRPO beta 0.5 eps 1.0, t1"),
    "sharp_t2": Arm("d", ("init", "t2"), {"beta": 0.5, "eps": 1.0}, description="MRPO beta 0.5 eps 1.0, t2"),
    "sharp_random": Arm(
        "d", ("init", "random"), {"beta": 0.5, "eps": 1.0}, description="MRPO beta 0.5 eps 1.0, random"
    ),
    # Length-controlled variants (HH-RLHF family only; loss.length_normalize, method.md §7).
    "dpo_ln": Arm("a", ("init",), {"length_normalize": True, "beta": BETA_LN}, description="DPO per token"),
    "noctro_t1_ln": Arm(
        "c",
        ("init", "t1"),
        {"clip": "off", "length_normalize": True, "beta": BETA_LN},
        description="MRPO without CTRO per token, t1",
    ),
    "dpo_ref_t1_ln": Arm(
        "e",
        ("t1",),
        {"length_normalize": True, "beta": BETA_LN},
        description="DPO per token against t1 alone",
    ),
    "noctro_random_ln": Arm(
        "c",
        ("init", "random"),
        {"clip": "off", "length_normalize": True, "beta": BETA_LN},
        description="MRPO without CTRO per token, random",
    ),
    "mrpo_gemma": Arm("b", ("init", "gemma"), description="MRPO defaults, Gemma-3-270M as it is"),
    "k3": Arm("f", ("init", "t1", "gemma"), description="MRPO K = 3: start + t1 + Gemma as it is"),
}


def variant(arm: str) -> str:
    """The arm-name suffix of the length-normalised variant ("_ln"), or ""."""
    return "_ln" if ARMS[arm].loss.get("length_normalize") else ""


BASELINE = {arm: ("dpo_b0.5" if ARMS[arm].loss.get("beta") == 0.5 else "dpo" + variant(arm)) for arm in ARMS}
"""Each arm's DPO at the same beta (and the same length normalisation)."""
RANDOM_CONTROL = {"b": "mrpo_random", "c": "noctro_random", "d": "sharp_random"}


def random_control(arm: str) -> str:
    """The same arm with the random-init reference in place of the teacher."""
    return RANDOM_CONTROL[ARMS[arm].letter] + variant(arm)


PRIMARY_ARMS = (
    "dpo", "oracle", "mrpo_t1", "mrpo_t2", "dpo_ref_t1", "dpo_ref_t2", "noctro_t1", "noctro_t2", "mrpo_random",
    "noctro_random", "dpo_b0.5", "sharp_t1", "sharp_t2", "sharp_random",
)  # fmt: skip
"""Run on every seed, in this order within a seed: what the decision rule needs, and the oracle."""
SECONDARY_ARMS = ("mrpo_gemma", "k3")
"""Run on ``secondary_seeds`` only, after the primary grid."""


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...] = tuple(range(10))
    arms: tuple[str, ...] = PRIMARY_ARMS
    secondary_arms: tuple[str, ...] = SECONDARY_ARMS
    secondary_seeds: tuple[int, ...] = tuple(range(5))
    teachers: tuple[str, ...] = TEACHERS
    train_facts: int = 64
    noise: float = 0.3
    epochs: float = 2.0
    batch_size: int = 4
    learning_rate: float = 1e-3
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    bf16: bool = True
    """bf16 autocast (fp32 master weights) for training and held-out scoring, as on a GPU."""
    max_length: int = 512
    known_fraction: float = 0.5
    """Share of the pool facts (drawn round-robin over the kinds) the teachers are trained on."""
    teacher_epochs: float = 3.0
    teacher_learning_rate: float = 1e-3
    teacher_lora_r: int = 16
    teacher_beta: float = 0.1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Settings:
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in raw.items()})


QUICK = Settings(
    seeds=(0,),
    arms=("dpo", "mrpo_t1", "dpo_ref_t1"),
    secondary_arms=(),
    secondary_seeds=(),
    teachers=("t1",),
    teacher_epochs=1.0,
)


@dataclass(frozen=True)
class RunSpec:
    group: str
    """"teacher", "probe", "start" or "main"."""
    arm: str
    seed: int = 0

    @property
    def name(self) -> str:
        if self.group == "teacher":
            return f"teachers/{self.arm}"
        if self.group == "probe":
            return "probe"
        if self.group == "start":
            return f"start/s{self.seed}"
        return f"students/{self.arm}/s{self.seed}"


def expand_grid(settings: Settings) -> list[RunSpec]:
    """Teachers, their probe, then seed by seed (a cut grid still holds complete paired sets), then the secondary
    arms."""
    runs = [RunSpec("teacher", name) for name in settings.teachers] + [RunSpec("probe", "probe")]
    for seed in settings.seeds:
        runs.append(RunSpec("start", "start", seed))
        runs += [RunSpec("main", arm, seed) for arm in settings.arms]
    for seed in settings.secondary_seeds:
        runs += [RunSpec("main", arm, seed) for arm in settings.secondary_arms]
    return runs


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------


def known_facts(settings: Settings) -> set[str]:
    """The keys of the pool facts the teachers learn (drawn round-robin over the kinds, fixed for the whole study)."""
    pool, _ = reworded_facts.split_facts(reworded_facts.all_facts())
    count = round(settings.known_fraction * len(pool))
    return {
        fact.key for fact in reworded_facts.sample_stratified(pool, count, random.Random("teacher-known"))
    }


def write_study_data(settings: Settings, data_dir: Path) -> dict[str, Path]:
    """The teachers' training pairs, the probe (every pool fact in wording 0, true labels), the disjoint test, and
    per seed the noisy training facts and their reworded test."""
    pool, disjoint = reworded_facts.split_facts(reworded_facts.all_facts())
    known = known_facts(settings)

    def tagged(record: dict) -> dict:
        return {**record, "teacher_known": record["fact"] in known}

    paths = {
        "teacher": write_jsonl(
            data_dir / "teacher-train.jsonl",
            [
                tagged(fact.pair(wording))
                for fact in pool
                if fact.key in known
                for wording in reworded_facts.TEACHER_WORDINGS
            ],
        ),
        "probe": write_jsonl(data_dir / "probe.jsonl", [tagged(fact.pair(0)) for fact in pool]),
        "disjoint": write_jsonl(data_dir / "disjoint.jsonl", [tagged(fact.pair(0)) for fact in disjoint]),
    }
    for seed in sorted({*settings.seeds, *settings.secondary_seeds}):
        rng = random.Random(f"teacher-study-facts-{seed}")
        chosen = reworded_facts.sample_stratified(pool, settings.train_facts, rng)
        flips = set(
            random.Random(f"teacher-study-flips-{seed}").sample(
                range(len(chosen)), round(settings.noise * len(chosen))
            )
        )
        directory = data_dir / f"s{seed}"
        train = [tagged(fact.pair(0, flipped=index in flips)) for index, fact in enumerate(chosen)]
        write_jsonl(directory / "train.jsonl", train)
        write_jsonl(directory / "train-clean.jsonl", [record for record in train if not record["flipped"]])
        flipped = {record["fact"] for record in train if record["flipped"]}
        reworded = [
            {**tagged(fact.pair(wording)), "trained_flipped": fact.key in flipped}
            for fact in chosen
            for wording in range(1, reworded_facts.WORDINGS)
        ]
        write_jsonl(directory / "reworded.jsonl", reworded)
    return paths


def chosen_longer(records: Sequence[dict]) -> float:
    """Share of pairs whose chosen answer has more characters than the rejected one."""

    def length(completion) -> int:
        return sum(len(m["content"]) for m in completion) if isinstance(completion, list) else len(completion)

    longer = [length(r["chosen"]) > length(r["rejected"]) for r in records]
    return sum(longer) / len(longer) if longer else math.nan


# ------------------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------------------


def paired_rate_difference(first: Sequence[bool], second: Sequence[bool]) -> dict[str, float]:
    """mean(first - second) over pairs with a normal 95% interval on the per-pair differences (paired)."""
    diffs = [float(a) - float(b) for a, b in zip(first, second, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else math.nan
    half = 1.96 * math.sqrt(variance / n) if n > 1 else math.nan
    return {"difference": mean, "low": mean - half, "high": mean + half, "pairs": n}


class Runner:
    """Builds the teachers, probes them, trains the students and scores them on the held-out sets.

    The facts family's layout; another family (experiments/hh_study.py) overrides the class attributes and
    ``held_out_file`` / ``groups``."""

    families: tuple[str, ...] = ("reworded", "disjoint")
    """The held-out families every student is scored on."""
    seed_independent: tuple[str, ...] = ("disjoint",)
    """The families whose held-out file is the same every seed (kept prepared across seeds)."""
    probe_files: tuple[str, ...] = ("probe", "disjoint")
    """The data files (``data/<name>.jsonl``) the probe scores every model on; ``mrpo inspect`` runs on the first."""

    def __init__(self, settings: Settings, output_dir: Path, cache_root: Path, models: dict[str, str]):
        self.settings = settings
        self.output_dir = output_dir
        self.cache_root = cache_root
        self.models = dict(models)
        self.data_dir = output_dir / "data"
        self._prepared: dict[str, Any] = {}

    def config(
        self, run_dir: Path, train: Path, references: Sequence[str], *, policy: str = "init", **sections
    ):
        from mrpo.demo.config import run_config

        s = self.settings
        return run_config(
            policy=self.models[policy],
            references={name: self.models[name] for name in references},
            train=train,
            eval=sections.pop("evaluation", None),
            output_dir=run_dir,
            cache_dir=self.cache_root / "references",
            data={"max_length": s.max_length, "seed": sections.pop("seed", 0)},
            loss=sections.pop("loss", {}),
            lora=sections.pop("lora", {"enabled": True, "r": s.lora_r, "alpha": 2 * s.lora_r, "dropout": 0.0,
                                       "target_modules": list(s.lora_targets)}),
            training=sections.pop("training"),
            quiet_reference_warning=references[0] != policy,
        )  # fmt: skip

    def teacher_model(self, name: str) -> str:
        return str(self.output_dir / RunSpec("teacher", name).name / "merged")

    def __call__(self, run: RunSpec, run_dir: Path) -> dict[str, Any]:
        if run.group == "teacher":
            return self.build_teacher(run, run_dir)
        if run.group == "probe":
            return self.probe(run_dir)
        checkpoint, train = None, {}
        if run.group == "main":
            train = self.train(run, run_dir)
            checkpoint = train.pop("checkpoint")
        return {"train": train, "eval": self.evaluate(run, checkpoint)}

    # -- teachers -------------------------------------------------------------------------------------------

    def build_teacher(self, run: RunSpec, run_dir: Path) -> dict[str, Any]:
        """DPO with LoRA on the teacher-known facts in the teacher wordings, merged (``lora.save_merged``)."""
        from mrpo.pipeline import run_train

        s = self.settings
        base = {"t1": "init", "t2": "gemma"}[run.arm]
        config = self.config(
            run_dir,
            self.data_dir / "teacher-train.jsonl",
            (base,),
            policy=base,
            loss={"beta": s.teacher_beta},
            lora={"enabled": True, "r": s.teacher_lora_r, "alpha": 2 * s.teacher_lora_r, "dropout": 0.0,
                  "target_modules": list(s.lora_targets), "save_merged": True},
            training={"per_device_train_batch_size": s.batch_size, "num_train_epochs": s.teacher_epochs,
                      "learning_rate": s.teacher_learning_rate, "seed": 0, "bf16": s.bf16},
        )  # fmt: skip
        begin = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_train(config, show_progress=False)
        statistics = training_statistics(result.metrics_file)
        statistics.pop("loss_curve")
        return {
            "base": base,
            "merged": str(result.merged_model_dir),
            "weights_sha256": weights_sha256(Path(result.merged_model_dir)),
            "pairs": len(read_jsonl(self.data_dir / "teacher-train.jsonl")),
            "train": statistics,
            "seconds_train": round(time.perf_counter() - begin, 1),
        }

    def probe(self, run_dir: Path) -> dict[str, Any]:
        """What each model knows, before any student: `mrpo inspect` on the pool facts in wording 0 (true labels),
        and each reference's label agreement against the start's, by teacher-known / unknown facts."""
        from mrpo.pipeline import run_inspect
        from mrpo.prepared_split import prepare_split

        names = self.reference_names
        results: dict[str, Any] = {}
        for file in self.probe_files:
            config = self.config(run_dir / file, self.data_dir / f"{file}.jsonl", names, training={"seed": 0})
            prepared = prepare_split(config, "train", show_progress=False)
            if file == self.probe_files[0]:
                config_path = run_dir / "probe.yaml"
                config.save(config_path)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run_inspect(
                        config, output=run_dir / "inspect", config_path=str(config_path), show_progress=False
                    )
            known = self.metadata(prepared, "teacher_known")
            margins = prepared.dataset.reference_chosen_logps - prepared.dataset.reference_rejected_logps
            results[file] = knowledge(names, margins, known)
            for name, extra in self.probe_extras(prepared, names, margins).items():
                results[file][name].update(extra)
        return results

    def probe_extras(self, prepared, names, margins) -> dict[str, Any]:
        """More of the probe's statistics: model name -> entries added to its ``knowledge`` (none for the facts)."""
        return {}

    @property
    def reference_names(self) -> tuple[str, ...]:
        """Every model scored on the held-out sets, the start first."""
        return ("init", *self.settings.teachers, "gemma", "random")

    def held_out_file(self, family: str, seed: int) -> Path:
        return self.data_dir / ("disjoint.jsonl" if family == "disjoint" else f"s{seed}/reworded.jsonl")

    # -- students -------------------------------------------------------------------------------------------

    def student_config(self, run: RunSpec, run_dir: Path, train: Path):
        s = self.settings
        arm = ARMS[run.arm]
        return self.config(
            run_dir,
            train,
            arm.references,
            seed=run.seed,
            loss={"beta": 0.1, **arm.loss},
            training={"per_device_train_batch_size": s.batch_size, "num_train_epochs": s.epochs,
                      "learning_rate": s.learning_rate, "seed": run.seed, "bf16": s.bf16},
        )  # fmt: skip

    def train(self, run: RunSpec, run_dir: Path) -> dict[str, Any]:
        from mrpo.pipeline import run_train

        arm = ARMS[run.arm]
        train_file = (
            self.data_dir / f"s{run.seed}" / ("train-clean.jsonl" if arm.train_filter else "train.jsonl")
        )
        config = self.student_config(run, run_dir, train_file)
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

    def prepared(self, family: str, seed: int):
        """A held-out split with every model's reference column (tokenized and scored once per seed)."""
        data = self.held_out_file(family, seed)
        if data not in self._prepared:
            from mrpo.prepared_split import prepare_split

            names = self.reference_names
            config = self.config(
                self.output_dir / "scratch", data, names, evaluation=data, training={"seed": 0}
            )
            fixed = {self.held_out_file(family, seed) for family in self.seed_independent}
            self._prepared = {k: v for k, v in self._prepared.items() if k in fixed}  # one seed at a time
            self._prepared[data] = (prepare_split(config, "eval", show_progress=False), names)
        return self._prepared[data]

    def metadata(self, prepared, column: str) -> list:
        by_id = {pair.pair_id: pair.metadata.get(column) for pair in prepared.text_pairs()}
        return [by_id[pair_id] for pair_id in prepared.tokenization.pair_ids]

    def evaluate(self, run: RunSpec, checkpoint: str | None) -> dict[str, Any]:
        import torch

        from mrpo.evaluation import score_split
        from mrpo.models import load_for_evaluation

        begin = time.perf_counter()
        data = self.held_out_file(self.families[-1], run.seed)
        model = load_for_evaluation(
            self.config(self.output_dir / "scratch", data, ("init",), training={"seed": 0}),
            checkpoint,
            torch.device("cpu"),
        )
        precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.settings.bf16)
        results: dict[str, Any] = {}
        for family in self.families:
            prepared, names = self.prepared(family, run.seed)
            with precision:
                logps, tokens = score_split(model, prepared, run.arm, show_progress=False)
            results[family] = self.family_metrics(run, prepared, names, logps, tokens)
        del model
        results["seconds"] = round(time.perf_counter() - begin, 1)
        return results

    def groups(self, prepared) -> list[str]:
        """Each held-out pair's group: teacher-known or not x trained flipped or clean."""
        known = self.metadata(prepared, "teacher_known")
        flipped = self.metadata(prepared, "trained_flipped")
        return [
            ("known" if is_known else "unknown")
            + ("" if was_flipped is None else ("_flipped" if was_flipped else "_clean"))
            for is_known, was_flipped in zip(known, flipped, strict=True)
        ]

    def family_metrics(self, run: RunSpec, prepared, names, logps, tokens) -> dict[str, Any]:
        """Policy accuracy (overall and by ``groups``) and the paper's metric."""
        from mrpo.config.schema import LossConfig
        from mrpo.evaluation import compute_metrics

        correct = (logps[:, 0] > logps[:, 1]).tolist()
        groups: dict[str, list[bool]] = {}
        for right, name in zip(correct, self.groups(prepared), strict=True):
            groups.setdefault(name, []).append(right)
        chosen_refs = prepared.dataset.reference_chosen_logps
        rejected_refs = prepared.dataset.reference_rejected_logps
        arm = ARMS.get(run.arm, ARMS["dpo"])
        rows = [names.index(name) for name in arm.references]
        loss = LossConfig(**{"beta": 0.1, **arm.loss})
        start_w, start_l = chosen_refs[0], rejected_refs[0]

        def paper(policy_w, policy_l) -> dict[str, float]:
            own = compute_metrics(
                policy_w, policy_l, tokens[:, 0], tokens[:, 1], chosen_refs[rows], rejected_refs[rows], loss
            )
            start = compute_metrics(
                policy_w,
                policy_l,
                tokens[:, 0],
                tokens[:, 1],
                chosen_refs[:1],
                rejected_refs[:1],
                LossConfig(),
            )
            return {
                "reward_accuracy_own_virtual": own["reward_accuracy_virtual"],
                "reward_accuracy_start": start["reward_accuracy_initialising"],
                "clip_rate": own["clip_rate"],
            }

        return {
            "pairs": len(correct),
            "policy_accuracy": sum(correct) / len(correct),
            "policy_margin": float((logps[:, 0] - logps[:, 1]).double().mean()),
            "by_group": {k: {"policy_accuracy": sum(v) / len(v), "pairs": len(v)} for k, v in groups.items()},
            "paper_metric_step0": paper(start_w, start_l),
            "paper_metric_trained": paper(logps[:, 0], logps[:, 1]),
            "chosen_longer": chosen_longer_of(prepared),
        }


def chosen_longer_of(prepared) -> float:
    by_id = {pair.pair_id: pair for pair in prepared.text_pairs()}
    records = [
        {"chosen": by_id[pair_id].chosen, "rejected": by_id[pair_id].rejected}
        for pair_id in prepared.tokenization.pair_ids
    ]
    return chosen_longer(records)


def knowledge(names: Sequence[str], margins, known: Sequence[bool]) -> dict[str, Any]:
    """Per model: label agreement (d > 0) and mean |margin| on all / teacher-known / unknown facts, and against the
    start (row 0): the paired difference in agreement and the share of pairs on the label's side with a larger
    margin than the start's."""
    result: dict[str, Any] = {}
    subsets = {
        "all": list(range(len(known))),
        "known": [i for i, k in enumerate(known) if k],
        "unknown": [i for i, k in enumerate(known) if not k],
    }
    start = margins[0].double()
    for row, name in enumerate(names):
        margin = margins[row].double()
        entry = {}
        for subset, index in subsets.items():
            if not index:
                continue
            m, s = margin[index], start[index]
            entry[subset] = {
                "pairs": len(index),
                "agreement": float((m > 0).double().mean()),
                "mean_abs_margin": float(m.abs().mean()),
                "mean_margin": float(m.mean()),
                "vs_start": paired_rate_difference((m > 0).tolist(), (s > 0).tolist()),
                "beyond_start": float(((m > 0) & (m > s)).double().mean()),
                "less_confident": float((m.abs() < s.abs()).double().mean()),
            }
        result[name] = entry
    return result


def teacher_beats_start(probe: dict[str, Any], teacher: str) -> bool:
    """The gate fixed before the runs: label agreement on the known facts above the start's, interval above 0."""
    entry = probe.get("probe", {}).get(teacher, {}).get("known")
    return bool(entry) and entry["vs_start"]["low"] > 0


# ------------------------------------------------------------------------------------------------------------
# Reusing a committed summary
# ------------------------------------------------------------------------------------------------------------


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over a saved model's weight files (``*.safetensors``, by name), what a teacher is identified by."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def same_json(first: Any, second: Any) -> bool:
    """Equal as JSON writes them (a NaN equals a NaN, as it does not in Python)."""
    return json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def record_teacher_hashes(output_dir: Path, runs: Sequence[RunSpec]) -> None:
    """Add ``weights_sha256`` to each finished teacher's result that lacks it (teachers built before the hash was
    recorded), so that the summary identifies them."""
    for run in runs:
        path = output_dir / run.name / RESULT_FILE
        if run.group != "teacher" or not path.exists():
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        if "weights_sha256" not in result and Path(result["merged"]).exists():
            result["weights_sha256"] = weights_sha256(Path(result["merged"]))
            write_json_atomic(path, result)


def reuse_summary(summary_path: Path, output_dir: Path, runs: Sequence[RunSpec], log=print) -> int:
    """Write the summary's student results into ``output_dir`` as finished runs, if this directory's teachers and
    probe are finished and equal the summary's; return how many runs were taken. Refuses (SystemExit) when they
    differ: the summary's students were trained against other teachers."""
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    recorded = {RunSpec(r["group"], r["arm"], r["seed"]).name: r for r in summary["results"]}
    gate = [run for run in runs if run.group in ("teacher", "probe")]
    if not all((output_dir / run.name / RESULT_FILE).exists() for run in gate):
        return 0  # the teachers and the probe come first; the caller asks again once they are finished
    record_teacher_hashes(output_dir, gate)
    for run in gate:
        mine = json.loads((output_dir / run.name / RESULT_FILE).read_text(encoding="utf-8"))
        theirs = recorded.get(run.name)
        if theirs is None:
            raise SystemExit(f"--reuse: {summary_path} has no {run.name}; it cannot be compared")
        if run.group == "teacher":
            same = (
                same_json(mine["train"], theirs["train"])
                and theirs.get("weights_sha256", mine["weights_sha256"]) == (mine["weights_sha256"])
            )
        else:
            same = same_json(mine["probe"], theirs["probe"]) and same_json(
                mine["disjoint"], theirs["disjoint"]
            )
        if not same:
            raise SystemExit(
                f"--reuse: {run.name} differs from {summary_path}'s; its students trained against other teachers"
            )
    taken = 0
    for run in runs:
        result = recorded.get(run.name)
        run_dir = output_dir / run.name
        if run.group in ("teacher", "probe") or result is None or (run_dir / RESULT_FILE).exists():
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)
        write_json_atomic(run_dir / RESULT_FILE, {**result, "reused_from": str(summary_path)})
        taken += 1
    log(
        f"--reuse: teachers and probe equal {summary_path}'s to the last digit; {taken} finished runs taken from it"
    )
    return taken


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, t1 only, 3 arms (~15 min)")
    parser.add_argument("--output-dir", default=None, help="default runs/teacher-study (-quick with --quick)")
    parser.add_argument("--resume", action="store_true", help="continue a study; finished runs are skipped")
    parser.add_argument("--cache-dir", default=None, help="models + reference cache (default $MRPO_CACHE)")
    parser.add_argument(
        "--docs", default="docs/results-teacher-study.md", help="the markdown report to write"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="number of seeds (0..N-1) of the primary grid"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="render the report from finished runs only"
    )
    parser.add_argument(
        "--reuse",
        default=None,
        help="a committed summary.json whose student results are taken once the teachers and probe equal its own",
    )
    args = parser.parse_args(argv)

    from mrpo.demo.models import GEMMA3, SMOLLM2, default_cache_dir, ensure_demo_model

    started = time.perf_counter()
    settings = QUICK if args.quick else Settings()
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=tuple(range(args.seeds)))
    output_dir = Path(args.output_dir or ("runs/teacher-study-quick" if args.quick else "runs/teacher-study"))
    if args.report_only:
        settings = Settings.from_json(json.loads((output_dir / "settings.json").read_text(encoding="utf-8")))
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        check_settings(output_dir, settings, args.resume)
    cache_root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    from study import make_divergent_reference

    models = {
        "init": str(ensure_demo_model(SMOLLM2, cache_root)),
        "gemma": str(ensure_demo_model(GEMMA3, cache_root)),
    }
    models["random"] = str(make_divergent_reference(models["init"], output_dir / "models" / "random"))
    write_study_data(settings, output_dir / "data")
    runner = Runner(settings, output_dir, cache_root, models)
    for name in TEACHERS:
        models[name] = runner.teacher_model(name)
    runner.models.update(models)
    runs = expand_grid(settings)
    if args.report_only:
        runs = [run for run in runs if (output_dir / run.name / RESULT_FILE).exists()]
    print(f"{len(runs)} runs; output {output_dir}", flush=True)
    lines: list[str] = []

    def log(message: str) -> None:
        lines.append(message)
        print(message, flush=True)

    record_teacher_hashes(output_dir, runs)
    if args.reuse and not args.report_only:
        gate = [run for run in runs if run.group in ("teacher", "probe")]
        run_grid(gate, output_dir, runner, log=log)
        reuse_summary(Path(args.reuse), output_dir, runs, log=log)
    results = run_grid(runs, output_dir, runner, log=log)
    runtime = time.perf_counter() - started
    command = " ".join(
        [".venv/bin/python experiments/teacher_study.py", *(argv if argv is not None else sys.argv[1:])]
    )
    ran = sum(1 for line in lines if line.endswith(": running"))
    invocations = record_invocation(output_dir, command, runtime, ran)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    machine = f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU; load {load}"
    from teacher_report import write_report

    inspect_file = output_dir / RunSpec("probe", "probe").name / "inspect" / "inspect.json"
    audit = json.loads(inspect_file.read_text(encoding="utf-8")) if inspect_file.exists() else None
    write_report(results, settings, invocations, Path(args.docs), machine=machine, audit=audit)
    print(f"report: {args.docs}; {len(results)} results; runtime {runtime / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
