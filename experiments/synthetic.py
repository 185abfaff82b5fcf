"""A controlled synthetic world for MRPO (issue 7): what each reference knows is known by construction.

Three disjoint sets of facts A, B, C ("the color of zorb is teal"), a word-level tokenizer, and three tiny Llama
models pretrained in-process with a plain next-token loss: ``model_A`` has seen the facts of A, ``model_B`` those of
B, ``model_AB`` both; nobody has seen C. The policy starts from ``model_A``. Preference pairs (chosen = the true
value, rejected = another value of the same relation) are drawn over the facts of all three sets and split by fact:
a scarce train part (one pair per train fact) and held-out facts that no run trains on. Every run is an ordinary
``mrpo.pipeline.run_train`` (full fine-tuning, the same hyperparameters for every method); the final model is scored
on every (prompt, value) of the world, so per-set accuracies are exact.

    .venv/bin/python experiments/synthetic.py [--output-dir runs/synthetic] [--seeds 3] [--quick]

Each seed draws its own world (entity names, facts, split, distractors) and pretrains its own three models.
``docs/results-synthetic.md`` and ``docs/synthetic/*.png`` are rendered from ``summary.json``. Finished runs
(``result.json``) are not redone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stats import loss_statistics, mean_ci

from mrpo.report_tables import markdown_table

SETS = ("A", "B", "C")
RELATIONS: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "teal", "pink", "gray", "gold", "black"),
    "food": ("apples", "bread", "fish", "rice", "corn", "nuts", "figs", "eggs"),
    "home": ("cave", "lake", "hill", "farm", "city", "moor", "wood", "reef"),
}
TEMPLATE = ("the", "of", "is")
SPECIALS = ("<pad>", "<eos>", "<unk>")
ONSETS = "bdfgklmnprstvz"
VOWELS = "aeiou"
CODAS = "bdgklmnprstxz"


@dataclass(frozen=True)
class WorldSettings:
    entities_per_set: int = 12
    train_facts_per_set: int = 12  # of the 36 facts per set; the other 24 are held out
    hidden: int = 64
    layers: int = 2
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    flip_share: float = 1 / 3  # of each set's train pairs, swapped in the noisy arm


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 4
    batch_size: int = 4
    learning_rate: float = 5e-4
    beta: float = 0.1


@dataclass(frozen=True)
class Method:
    references: tuple[str, ...]  # model names; the first is the initialising one (= the policy's start)
    loss: dict[str, Any] = field(default_factory=dict)
    description: str = ""


METHODS: dict[str, Method] = {
    "dpo": Method(("A",), {}, "DPO, reference model_A (the policy's start), K = 1"),
    "mrpo_B": Method(("A", "B"), {}, "MRPO + model_B: harmonic, adaptive alpha, adaptive CTRO eps_max 0.1"),
    "mrpo_B_noclip": Method(("A", "B"), {"clip": "off"}, "MRPO + model_B, adaptive alpha, CTRO off"),
    "mrpo_B_align": Method(("A", "B"), {"align": "pair"}, "MRPO + model_B, adaptive CTRO, align=pair"),
    "mrpo_B_eps1": Method(("A", "B"), {"eps": 1.0}, "MRPO + model_B, adaptive CTRO eps_max 1.0"),
    "dpo_refB": Method(
        ("B",), {}, "DPO with model_B as the only reference (K = 1); the policy starts from model_A"
    ),
    "mrpo_AB": Method(("A", "AB"), {}, "MRPO + model_AB, adaptive alpha, adaptive CTRO eps_max 0.1"),
    "mrpo_AB_noclip": Method(("A", "AB"), {"clip": "off"}, "MRPO + model_AB, adaptive alpha, CTRO off"),
}
QUICK_METHODS = ("dpo", "mrpo_B", "mrpo_B_noclip")
NOISY_METHODS = ("dpo", "mrpo_B", "mrpo_B_noclip", "mrpo_AB_noclip", "dpo_refB")
"""Trained on the noisy arm as well (a third of each set's labels swapped), as ``<method>@noisy``."""
MODELS = {"A": ("A",), "B": ("B",), "AB": ("A", "B")}

# ------------------------------------------------------------------------------------------------------------
# The world
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str
    fact_set: str

    @property
    def prompt(self) -> str:
        return f"the {self.relation} of {self.entity} is"

    @property
    def sentence(self) -> str:
        return f"{self.prompt} {self.value}"


@dataclass
class World:
    seed: int
    facts: list[Fact]
    train_facts: list[Fact]
    test_facts: list[Fact]
    train_pairs: list[dict[str, Any]]
    noisy_pairs: list[dict[str, Any]] = field(default_factory=list)

    def facts_of(self, *sets: str) -> list[Fact]:
        return [fact for fact in self.facts if fact.fact_set in sets]

    def vocabulary(self) -> list[str]:
        entities = sorted({fact.entity for fact in self.facts})
        values = [value for values in RELATIONS.values() for value in values]
        return [*SPECIALS, *TEMPLATE, *RELATIONS, *values, *entities]


def entity_names(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct made-up names (consonant-vowel-consonant, sometimes a final vowel), e.g. zorb-like."""
    reserved = set(TEMPLATE) | set(RELATIONS) | {v for values in RELATIONS.values() for v in values}
    names: list[str] = []
    while len(names) < count:
        name = rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) + rng.choice(["", *VOWELS])
        if name not in reserved and name not in names:
            names.append(name)
    return names


def build_world(seed: int, settings: WorldSettings = WorldSettings()) -> World:
    """Disjoint entity sets A, B, C; every entity has one value per relation; split by fact; one pair per train fact."""
    rng = random.Random(seed)
    pool = entity_names(3 * settings.entities_per_set, rng)
    facts = []
    for index, fact_set in enumerate(SETS):
        for entity in sorted(
            pool[index * settings.entities_per_set : (index + 1) * settings.entities_per_set]
        ):
            for relation, values in RELATIONS.items():
                facts.append(Fact(entity, relation, rng.choice(values), fact_set))
    train_facts, test_facts = [], []
    for fact_set in SETS:
        members = [fact for fact in facts if fact.fact_set == fact_set]
        rng.shuffle(members)
        train_facts += members[: settings.train_facts_per_set]
        test_facts += members[settings.train_facts_per_set :]
    pairs = []
    for fact in train_facts:
        rejected = rng.choice([v for v in RELATIONS[fact.relation] if v != fact.value])
        pairs.append(
            {
                "prompt": fact.prompt,
                "chosen": f" {fact.value}",
                "rejected": f" {rejected}",
                "kind": fact.fact_set,
            }
        )
    # The noisy arm: the same pairs with chosen and rejected swapped on a share of each set's pairs (own RNG, so
    # the clean world does not depend on it).
    flip_rng = random.Random(10_000 + seed)
    noisy = [dict(pair, flipped=False) for pair in pairs]
    for fact_set in SETS:
        members = [i for i, pair in enumerate(noisy) if pair["kind"] == fact_set]
        for i in flip_rng.sample(members, round(settings.flip_share * len(members))):
            pair = noisy[i]
            noisy[i] = dict(pair, chosen=pair["rejected"], rejected=pair["chosen"], flipped=True)
    return World(seed, facts, train_facts, test_facts, pairs, noisy)


def make_tokenizer(world: World):
    """Word-level tokenizer over the world's words; eos appended by mrpo to completions, pads right, no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(world.vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def make_model(vocab_size: int, settings: WorldSettings, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden,
        intermediate_size=2 * settings.hidden,
        num_hidden_layers=settings.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def encode_sentences(tokenizer, sentences: Sequence[str]):
    """Padded ids + mask of ``sentence <eos>`` (the same tokens mrpo scores for prompt + completion + EOS)."""
    import torch

    rows = [tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for s in sentences]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def pretrain(world: World, sets: Sequence[str], settings: WorldSettings, seed: int):
    """A tiny Llama trained on the sentences of ``sets`` (plain next-token loss, full batch, AdamW)."""
    import torch

    tokenizer = make_tokenizer(world)
    model = make_model(len(tokenizer), settings, seed)
    ids, mask = encode_sentences(tokenizer, [fact.sentence for fact in world.facts_of(*sets)])
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.0)
    model.train()
    for _ in range(settings.pretrain_steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, tokenizer, float(loss.detach())


def score_values(model, tokenizer, facts: Sequence[Fact]):
    """log p(value <eos> | prompt) for every value of each fact's relation: a (len(facts), 8) float tensor."""
    import torch

    sentences = [f"{fact.prompt} {value}" for fact in facts for value in RELATIONS[fact.relation]]
    ids, mask = encode_sentences(tokenizer, sentences)
    prompt_length = len(tokenizer(facts[0].prompt, add_special_tokens=False)["input_ids"]) if facts else 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    completion = mask[:, 1:].clone()
    completion[:, : prompt_length - 1] = 0  # every prompt here has the same length (5 words)
    return (logps * completion).sum(-1).view(len(facts), -1)


def knowledge(scores, facts: Sequence[Fact]) -> dict[str, float]:
    """Top-1 accuracy over the relation's values and pairwise accuracy against every wrong value."""
    truth = [RELATIONS[f.relation].index(f.value) for f in facts]
    top1 = sum(int(row.argmax()) == t for row, t in zip(scores, truth, strict=True)) / max(len(facts), 1)
    wins = total = 0
    for row, t in zip(scores, truth, strict=True):
        for j in range(len(row)):
            if j != t:
                wins += int(row[t] > row[j])
                total += 1
    return {"top1": top1, "pairwise": wins / max(total, 1), "facts": len(facts)}


# ------------------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def prepare_seed(seed: int, seed_dir: Path, settings: WorldSettings) -> tuple[World, dict[str, Any]]:
    """The seed's world, its three pretrained models (saved for mrpo) and what each model knows, per set."""
    world = build_world(seed, settings)
    write_jsonl(seed_dir / "train.jsonl", world.train_pairs)
    write_jsonl(seed_dir / "train_noisy.jsonl", world.noisy_pairs)
    info_file = seed_dir / "models.json"
    if info_file.exists():
        return world, json.loads(info_file.read_text(encoding="utf-8"))
    info: dict[str, Any] = {}
    for name, sets in MODELS.items():
        begin = time.perf_counter()
        model, tokenizer, final_loss = pretrain(world, sets, settings, seed=1000 * seed + len(info))
        directory = seed_dir / "models" / f"model_{name}"
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        info[name] = {
            "path": str(directory),
            "final_pretrain_loss": final_loss,
            "seconds": round(time.perf_counter() - begin, 1),
            "knowledge": evaluate_world(model, tokenizer, world),
        }
    info_file.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return world, info


def evaluate_world(model, tokenizer, world: World, train_pairs: Sequence[dict[str, Any]] | None = None):
    """Per set: held-out facts (top-1, pairwise vs all wrong values); train facts; train facts' unused values."""
    out: dict[str, Any] = {}
    train_pairs = train_pairs or world.train_pairs
    pairs = {(p["prompt"], side.strip()) for p in train_pairs for side in (p["chosen"], p["rejected"])}
    flipped = {p["prompt"] for p in train_pairs if p.get("flipped")}
    for fact_set in SETS:
        test = [f for f in world.test_facts if f.fact_set == fact_set]
        train = [f for f in world.train_facts if f.fact_set == fact_set]
        test_scores, train_scores = (
            score_values(model, tokenizer, test),
            score_values(model, tokenizer, train),
        )
        seen_pair = unseen_wins = unseen_total = flipped_wins = flipped_total = 0
        for fact, row in zip(train, train_scores, strict=True):
            values = RELATIONS[fact.relation]
            t = values.index(fact.value)
            for j, value in enumerate(values):
                if j == t:
                    continue
                if (fact.prompt, value) in pairs:
                    seen_pair += int(row[t] > row[j])
                    if fact.prompt in flipped:
                        flipped_wins += int(row[t] > row[j])
                        flipped_total += 1
                else:
                    unseen_wins += int(row[t] > row[j])
                    unseen_total += 1
        truth = [RELATIONS[f.relation].index(f.value) for f in train]
        out[fact_set] = {
            "heldout": knowledge(test_scores, test),
            "train": knowledge(train_scores, train),
            "train_pair_accuracy": seen_pair / max(len(train), 1),
            "train_unseen_distractors": unseen_wins / max(unseen_total, 1),
            # truth over the distractor on the pairs whose label was swapped (noisy arm; nan when none)
            "flipped_pair_accuracy": flipped_wins / flipped_total if flipped_total else math.nan,
            "train_true_logp": float(
                sum(row[t] for row, t in zip(train_scores, truth, strict=True)) / len(train)
            ),
        }
    return out


def mrpo_config(
    models: dict[str, str], method: Method, data: Path, run_dir: Path, seed: int, ts: TrainSettings
):
    from mrpo.demo.config import run_config

    return run_config(
        policy=models["A"],
        references={f"model_{n}": models[n] for n in method.references},
        train=data,
        output_dir=run_dir,
        cache_dir=run_dir.parent.parent / "cache",
        data={"max_length": 32, "seed": seed},
        loss={"beta": ts.beta, **method.loss},
        training={"per_device_train_batch_size": ts.batch_size, "num_train_epochs": ts.epochs,
                  "learning_rate": ts.learning_rate, "weight_decay": 0.0, "seed": seed},
        quiet_reference_warning=True,  # dpo_refB's only reference is model_B, on purpose
    )  # fmt: skip


def clip_statistics(
    world: World, models: dict[str, Any], tokenizer, method: Method, beta: float, train_pairs
):
    """Clip rate and mean alpha of the external reference on the train pairs, per set (reference numbers only)."""
    import torch

    from mrpo.config.schema import LossConfig
    from mrpo.losses import mrpo_loss

    if len(method.references) < 2:
        return {}
    loss = LossConfig(**{"beta": beta, **method.loss})
    out = {}
    for fact_set in SETS:
        pairs = [p for p in train_pairs if p["kind"] == fact_set]
        facts = {f.prompt: f for f in world.train_facts}
        rows = [facts[p["prompt"]] for p in pairs]
        chosen, rejected = [], []
        for name in method.references:
            scores = score_values(models[name], tokenizer, rows)
            index_w = [
                RELATIONS[f.relation].index(p["chosen"].strip()) for f, p in zip(rows, pairs, strict=True)
            ]
            index_l = [
                RELATIONS[f.relation].index(p["rejected"].strip()) for f, p in zip(rows, pairs, strict=True)
            ]
            chosen.append(scores[torch.arange(len(rows)), index_w])
            rejected.append(scores[torch.arange(len(rows)), index_l])
        ref_w, ref_l = torch.stack(chosen), torch.stack(rejected)
        result = mrpo_loss(ref_w[0], ref_l[0], ref_w, ref_l, **dataclasses.asdict(loss))
        stats = result.pair_statistics()
        virtual = (stats["rewards/rejected"] - stats["rewards/chosen"]) / loss.beta + ref_w[0] - ref_l[0]
        flips = torch.tensor([bool(p.get("flipped")) for p in pairs])
        weight = torch.sigmoid(-loss.beta * (ref_w[0] - ref_l[0] - virtual))
        out[fact_set] = {
            "clip_rate": float(stats["ctro/clip_rate"].float().mean()),
            "alpha_external": float(stats["alpha/ref2"].float().mean()),
            "external_margin": float((ref_w[1] - ref_l[1]).mean()),
            "init_margin": float((ref_w[0] - ref_l[0]).mean()),
            # the virtual reference's margin: what the policy's margin has to beat at the start
            # rewards are beta * (policy - log r) with the policy at model_A, so this recovers log r(y_w) - log r(y_l)
            "virtual_margin": float(virtual.mean()),
            # the same on the pairs whose label was swapped (noisy arm): negative = the virtual reference disagrees
            "virtual_margin_flipped": float(virtual[flips].mean()) if flips.any() else math.nan,
            # the DPO-style gradient weight sigma(-z) at the start (policy = model_A), mean over pairs
            "start_weight": float(weight.mean()),
            "start_weight_flipped": float(weight[flips].mean()) if flips.any() else math.nan,
        }
    return out


def run_one(world, info, method_name, seed, seed_dir, ts: TrainSettings) -> dict[str, Any]:
    import torch

    from mrpo.models import load_model
    from mrpo.pipeline import run_train

    base, _, arm = method_name.partition("@")
    method = METHODS[base]
    train_pairs = world.noisy_pairs if arm == "noisy" else world.train_pairs
    run_dir = seed_dir / "runs" / method_name
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text(encoding="utf-8"))
    paths = {name: entry["path"] for name, entry in info.items()}
    data_file = seed_dir / ("train_noisy.jsonl" if arm == "noisy" else "train.jsonl")
    config = mrpo_config(paths, method, data_file, run_dir, seed, ts)
    begin = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), open(run_dir / "train.log", "w", encoding="utf-8") as log:
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(log):  # the trainer prints every log line
            trained = run_train(config, show_progress=False)
    seconds = time.perf_counter() - begin
    tokenizer = make_tokenizer(world)
    policy = load_model(str(trained.final_model_dir), torch.float32, torch.device("cpu"))
    references = {n: load_model(paths[n], torch.float32, torch.device("cpu")) for n in method.references}
    train_log = loss_statistics(trained.metrics_file)
    logged_clip = [
        json.loads(line).get("ctro/clip_rate")
        for line in trained.metrics_file.read_text(encoding="utf-8").splitlines()
    ]
    logged_clip = [v for v in logged_clip if v is not None]
    result = {
        "method": method_name,
        "seed": seed,
        "seconds": round(seconds, 1),
        "train": {k: v for k, v in train_log.items() if k != "loss_curve"},
        "loss_curve": train_log["loss_curve"],
        "logged_clip_rate": sum(logged_clip) / len(logged_clip) if logged_clip else math.nan,
        "eval": evaluate_world(policy, tokenizer, world, train_pairs),
        "references": clip_statistics(world, references, tokenizer, method, ts.beta, train_pairs),
    }
    for path in trained.final_model_dir.glob("*.safetensors"):
        path.unlink()  # the evaluation is done; keep the run directory small
    run_dir.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------


def fmt(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, half, n = mean_ci(values)
    if n == 0:
        return "–"
    if n < 2 or not math.isfinite(half):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * half:.{digits}f}"


def collect(results: Sequence[dict], models: dict[int, dict], path: Sequence[str], fact_set: str):
    """method -> per-seed values of eval[fact_set][path...]; 'start' is model_A untrained."""
    out: dict[str, list[float]] = defaultdict(list)
    for _, info in sorted(models.items()):
        value = info["A"]["knowledge"][fact_set]
        for key in path:
            value = value[key]
        out["start"].append(value)
    for result in results:
        value = result["eval"][fact_set]
        for key in path:
            value = value[key]
        out[result["method"]].append(value)
    return out


def paired(results: Sequence[dict], path: Sequence[str], fact_set: str, baseline: str = "dpo"):
    by = {}
    for r in results:
        value = r["eval"][fact_set]
        for key in path:
            value = value[key]
        by[(r["method"], r["seed"])] = value
    diffs: dict[str, list[float]] = defaultdict(list)
    for (method, seed), value in sorted(by.items()):
        if method != baseline and (baseline, seed) in by:
            diffs[method].append(value - by[(baseline, seed)])
    return diffs


def write_plots(results, models, methods, directory: Path, noisy: Sequence[str] = ()) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for key, title, filename, names in (
        (
            ("heldout", "pairwise"),
            "held-out facts: policy preference accuracy",
            "heldout.png",
            ["start", *methods],
        ),
        (
            ("train_unseen_distractors",),
            "train facts, distractors never trained on",
            "train_unseen.png",
            ["start", *methods],
        ),
        (
            ("train_pair_accuracy",),
            "noisy labels (1/3 swapped): train pairs, truth over distractor",
            "noisy_train_pairs.png",
            ["start", *noisy],
        ),
    ):
        if len(names) < 2:
            continue
        fig, ax = plt.subplots(figsize=(9, 3.6))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            means, halves = [], []
            for fact_set in SETS:
                mean, half, _ = mean_ci(collect(results, models, key, fact_set)[name])
                means.append(100 * mean)
                halves.append(100 * half if math.isfinite(half) else 0.0)
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(SETS))]
            ax.bar(xs, means, width, yerr=halves, capsize=2, label=name)
        ax.set_xticks(range(len(SETS)), [f"set {s}" for s in SETS])
        ax.axhline(50, color="gray", lw=0.8, ls="--")
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(directory / filename, dpi=110)
        plt.close(fig)
        files.append(filename)
    return files


def render(summary: dict[str, Any], doc: Path, plot_dir: Path) -> None:
    results, methods = summary["results"], summary["methods"]
    noisy = summary.get("noisy_methods", [])
    models = {int(k): v for k, v in summary["models"].items()}
    ws, ts = summary["world_settings"], summary["train_settings"]
    plots = write_plots(results, models, methods, plot_dir, noisy)
    rel = os.path.relpath(plot_dir, doc.parent)
    n_seeds = len(models)
    lines = [
        f"# Synthetic world: when can an external reference help? ({n_seeds} seed(s), {len(methods)} methods)",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']}  ",
        f"Runtime: {summary['runtime_min']:.1f} min for this invocation (world building, pretraining, "
        f"{len(results)} runs and evaluation; runs already finished are skipped, not counted).",
        "",
        "## Setup",
        "",
        f"- **Facts.** Three disjoint sets A, B, C of {ws['entities_per_set']} made-up entities each; every entity "
        f"has one value for each of {len(RELATIONS)} relations ({', '.join(RELATIONS)}; 8 values each), drawn at "
        f"random, so {len(RELATIONS) * ws['entities_per_set']} facts per set, rendered as "
        "`the color of zorb is teal`. A word-level tokenizer (one token per word, EOS after the answer).",
        f"- **References.** Tiny Llamas (hidden {ws['hidden']}, {ws['layers']} layers, untied embeddings), "
        f"pretrained in-process with a plain next-token loss (full batch, AdamW lr {ws['pretrain_lr']}, "
        f"{ws['pretrain_steps']} steps): `model_A` on the sentences of A, `model_B` on B, `model_AB` on A and B. "
        "Nobody sees C. Each seed draws its own world and pretrains its own three models.",
        f"- **Pairs.** prompt `the color of zorb is`, chosen = the true value, rejected = a random other value of "
        f"the same relation. Split **by fact**: per set {ws['train_facts_per_set']} train facts with one pair each "
        f"({3 * ws['train_facts_per_set']} train pairs in all, the scarce regime), the other "
        f"{(len(RELATIONS) * ws['entities_per_set'] - ws['train_facts_per_set'])} facts per set are held out.",
        f"- **Training.** Policy = `model_A`, full fine-tuning through `mrpo.pipeline.run_train`; every method: "
        f"{ts['epochs']} epochs, batch {ts['batch_size']}, lr {ts['learning_rate']} constant, beta {ts['beta']}, "
        f"float32, seed = world seed.",
        "- **Evaluation** (the final model scores every value of every prompt, no sampling): *held-out* = facts "
        "no run trained on, pairwise accuracy against all 7 wrong values (= policy preference accuracy, spec §5) "
        "and top-1 over the 8 values; *train facts, unseen distractors* = the facts of the train pairs, against "
        "the 6 wrong values that were never a rejected answer (did the policy learn the fact, or only push one "
        "distractor down?); *train pairs* = the trained pairs themselves.",
        "",
        "Methods: " + "; ".join(f"`{m}`: {METHODS[m].description}" for m in methods) + ".",
        "",
        "± is the half-width of a 95% t-interval over seeds (absent with one seed). Numbers are percentages.",
        "",
        "## What each pretrained model knows (by construction, measured)",
        "",
    ]
    rows = []
    for name in MODELS:
        for fact_set in SETS:
            vals_top = [models[s][name]["knowledge"][fact_set]["heldout"]["top1"] for s in models]
            vals_tr = [models[s][name]["knowledge"][fact_set]["train"]["top1"] for s in models]
            rows.append([f"`model_{name}`", fact_set, fmt(vals_top), fmt(vals_tr)])
    lines += markdown_table(["model", "set", "top-1, held-out facts", "top-1, train facts"], rows)
    lines += ["", "Chance top-1 is 12.5%, chance pairwise 50%.", ""]
    for title, key in (
        (
            "Held-out facts: policy preference accuracy (pairwise vs every wrong value)",
            ("heldout", "pairwise"),
        ),
        ("Held-out facts: top-1 over the 8 values", ("heldout", "top1")),
        ("Train facts, distractors never trained on (pairwise)", ("train_unseen_distractors",)),
        ("Train facts: top-1 over the 8 values", ("train", "top1")),
        ("Train pairs themselves (chosen > rejected)", ("train_pair_accuracy",)),
    ):
        lines += [f"## {title}", ""]
        per_set = {fact_set: collect(results, models, key, fact_set) for fact_set in SETS}
        rows = [[f"`{m}`", *(fmt(per_set[s][m]) for s in SETS)] for m in ["start", *methods]]
        lines += markdown_table(["method", "set A", "set B", "set C"], rows) + [""]
        if key in (("heldout", "pairwise"), ("train_unseen_distractors",)):
            lines += ["Paired difference against `dpo` (same seed/world), points:", ""]
            diffs = {s: paired(results, key, s) for s in SETS}
            rows = [[f"`{m}` − `dpo`", *(fmt(diffs[s][m]) for s in SETS)] for m in methods if m != "dpo"]
            lines += markdown_table(["difference", "set A", "set B", "set C"], rows) + [""]
    lines += ["![held-out](" + f"{rel}/{plots[0]})", "", "![train unseen](" + f"{rel}/{plots[1]})", ""]
    lines += [
        "## CTRO clip rate and the external reference's weight, on the train pairs",
        "",
        "Computed from the references' own log-probs with `mrpo.losses.mrpo_loss` and the method's loss settings "
        "(the same numbers the trainer sees at step 0); *logged* is the mean of `ctro/clip_rate` over the "
        "training log. Margins are in nats, means over pairs; *virtual margin* is log r(y_w) − log r(y_l), the "
        "margin the policy must beat.",
        "",
    ]
    rows = []
    for m in [*methods, *noisy]:
        if len(METHODS[m.partition("@")[0]].references) < 2:
            continue
        mine = [r for r in results if r["method"] == m]
        for fact_set in SETS:
            refs = [r["references"][fact_set] for r in mine]
            rows.append(
                [
                    f"`{m}`",
                    fact_set,
                    fmt([x["clip_rate"] for x in refs]),
                    fmt([x["alpha_external"] for x in refs]),
                    fmt([x["init_margin"] for x in refs], 1, 2),
                    fmt([x["external_margin"] for x in refs], 1, 2),
                    fmt([x["virtual_margin"] for x in refs], 1, 2),
                    fmt([x["start_weight"] for x in refs], 1, 2),
                    fmt([r["logged_clip_rate"] for r in mine]) if fact_set == "A" else "",
                ]
            )
    lines += markdown_table(
        [
            "method",
            "set",
            "clip rate",
            "alpha ext.",
            "init margin",
            "ext. margin",
            "virtual margin",
            "weight σ(−z) at start",
            "logged (all sets)",
        ],
        rows,
    )
    lines += [
        "",
        "DPO's weight σ(−z) at the start is 0.5 on every pair (the policy is its reference). The loss's gradient "
        "is −β σ(−z) ∇(log π(y_w) − log π(y_l)): a reference, however knowledgeable, enters the update only through "
        "this per-pair scalar.",
        "",
    ]
    if noisy:
        lines += [
            "## Noisy labels: a third of each set's train pairs with chosen and rejected swapped",
            "",
            "The same worlds, models and hyperparameters; `<method>@noisy` trains on `train_noisy.jsonl`. "
            "*Swapped pairs* = accuracy of the truth over the distractor on the pairs whose label was wrong "
            "(lower = the policy learned the wrong label; the untrained start is not scored on the noisy labelling: "
            "model_A knows 100% of the A pairs and is near chance on B and C). *Virtual margin "
            "on swapped* = log r(labelled chosen) − log r(labelled rejected) at the start, negative when the virtual "
            "reference disagrees with the wrong label; *weight* = σ(−z) at the start on the swapped pairs (DPO: 0.5).",
            "",
        ]
        for title, key in (
            ("Swapped pairs: truth over distractor", ("flipped_pair_accuracy",)),
            ("All train pairs: truth over distractor", ("train_pair_accuracy",)),
            ("Train facts, distractors never trained on", ("train_unseen_distractors",)),
            ("Held-out facts (pairwise)", ("heldout", "pairwise")),
        ):
            per_set = {fact_set: collect(results, models, key, fact_set) for fact_set in SETS}
            diffs = {s: paired(results, key, s, baseline="dpo@noisy") for s in SETS}
            lines += [f"### {title}", ""]
            rows = [[f"`{m}`", *(fmt(per_set[s][m]) for s in SETS)] for m in ["start", *noisy]]
            rows += [
                [f"`{m}` − `dpo@noisy`", *(fmt(diffs[s][m]) for s in SETS)] for m in noisy if m != "dpo@noisy"
            ]
            lines += markdown_table(["method", "set A", "set B", "set C"], rows) + [""]
        rows = []
        for m in noisy:
            mine = [r for r in results if r["method"] == m and r["references"]]
            if not mine:
                continue
            rows.append(
                [
                    f"`{m}`",
                    *(fmt([r["references"][s]["virtual_margin_flipped"] for r in mine], 1, 2) for s in SETS),
                    *(fmt([r["references"][s]["start_weight_flipped"] for r in mine], 1, 2) for s in SETS),
                ]
            )
        lines += ["### The virtual reference on the swapped pairs", ""]
        lines += markdown_table(
            [
                "method",
                "virt. margin A",
                "virt. margin B",
                "virt. margin C",
                "weight A",
                "weight B",
                "weight C",
            ],
            rows,
        )
        if len(plots) > 2:
            lines += ["", f"![noisy]({rel}/{plots[2]})"]
        lines += [
            "",
            "For reference, model_A's own margin on a swapped pair (what DPO's reference says) is strongly "
            "negative on A and near 0 on B and C, but DPO's weight is 0.5 regardless, because the policy starts "
            "at model_A.",
            "",
        ]
    lines += ["", "## Training", ""]
    rows = [
        [
            f"`{m}`",
            fmt([r["train"]["max_loss"] for r in results if r["method"] == m], 1, 3),
            fmt([r["train"]["final_loss"] for r in results if r["method"] == m], 1, 3),
            str(sum(len(r["train"]["nonfinite_steps"]) for r in results if r["method"] == m)),
            fmt([r["seconds"] for r in results if r["method"] == m], 1, 1),
        ]
        for m in [*methods, *noisy]
    ]
    lines += markdown_table(["method", "max loss", "final loss", "non-finite steps", "seconds per run"], rows)
    lines += ["", "## Verdict", "", *summary.get("verdict", ["(written after the run)"]), ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines), encoding="utf-8")


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU, {platform.system()}; load average at the end {load}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/synthetic")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one seed, dpo / mrpo_B / mrpo_B_noclip")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--no-noisy", action="store_true", help="skip the noisy-label arm")
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    parser.add_argument("--render-only", action="store_true", help="re-render the doc from summary.json")
    parser.add_argument("--doc", default="docs/results-synthetic.md")
    parser.add_argument("--plot-dir", default="docs/synthetic")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    seeds = 1 if args.quick else args.seeds
    methods = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}")
    noisy = [] if args.no_noisy else [f"{m}@noisy" for m in NOISY_METHODS if m in methods]
    ws, ts = WorldSettings(), TrainSettings(epochs=args.epochs)
    output = Path(args.output_dir)
    if args.render_only:
        render(
            json.loads((output / "summary.json").read_text(encoding="utf-8")),
            Path(args.doc),
            Path(args.plot_dir),
        )
        return 0
    begin = time.perf_counter()
    results, models = [], {}
    for seed in range(seeds):
        seed_dir = output / f"seed{seed}"
        world, info = prepare_seed(seed, seed_dir, ws)
        models[seed] = info
        for method in [*methods, *noisy]:
            result = run_one(world, info, method, seed, seed_dir, ts)
            print(
                f"seed {seed} {method:22s} {result['seconds']:6.1f}s  held-out pairwise "
                + " ".join(f"{s}={100 * result['eval'][s]['heldout']['pairwise']:.0f}" for s in SETS)
                + "  train-unseen "
                + " ".join(f"{s}={100 * result['eval'][s]['train_unseen_distractors']:.0f}" for s in SETS),
                flush=True,
            )
            results.append(result)
    summary_file = output / "summary.json"
    previous = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.exists() else {}
    summary = {
        "command": ".venv/bin/python experiments/synthetic.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "runtime_min": (time.perf_counter() - begin) / 60,
        "world_settings": ws.__dict__,
        "train_settings": ts.__dict__,
        "methods": methods,
        "noisy_methods": noisy,
        "models": models,
        "results": results,
        "verdict": previous.get("verdict", []),
    }
    summary_file.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    render(summary, Path(args.doc), Path(args.plot_dir))
    print(f"wrote {summary_file} and {args.doc} in {summary['runtime_min']:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
