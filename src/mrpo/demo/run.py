"""`mrpo demo`: the whole pipeline on the embedded default, offline, on CPU, in a few minutes.

A small distillation setting with two model families: the policy SmolLM2-135M-Instruct starts from itself (the
initialising reference) and learns from the project's verifiable pairs against Gemma-3-270M (the external
reference: another family, another tokenizer, twice the size). Both references are precomputed once into the
shared cache; DPO (K = 1) and MRPO (K = 2) are trained with the same LoRA settings on the same scarce train split,
and the untrained start, DPO and MRPO are evaluated on the held-out split. Everything lands in one directory:

    OUTPUT/data/{train,test}.jsonl      the generated pairs
    OUTPUT/dpo/, OUTPUT/mrpo/           two ordinary `mrpo train` runs (config, metrics, checkpoints, final/)
    OUTPUT/results.json, OUTPUT/report/  the comparison: metrics, plots and report.md
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mrpo.config.schema import MRPOConfig
from mrpo.demo.config import run_config


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains on and for how long; the defaults take about 2.5 minutes on 2 CPU cores (models cached)."""

    output_dir: str = "runs/demo"
    cache_dir: str | None = None
    """Models and the reference cache; default $MRPO_CACHE or ~/.cache/mrpo."""
    policy: str | None = None
    """Policy and initialising reference (default: SmolLM2-135M-Instruct from PyPI)."""
    external: str | None = None
    """External reference (default: Gemma-3-270M from PyPI)."""
    train_pairs: int = 64
    test_pairs: int = 96
    epochs: float = 2.0
    batch_size: int = 4
    learning_rate: float = 5e-4
    beta: float = 0.1
    lora_r: int = 16
    max_length: int = 256
    seed: int = 0


def demo_config(
    settings: DemoSettings, name: str, policy: str, references: dict[str, str], cache: Path
) -> MRPOConfig:
    """One of the demo's two runs: ``references`` maps names to models, the initialising one first."""
    data_dir = Path(settings.output_dir) / "data"
    return run_config(
        policy=policy,
        references=references,
        train=data_dir / "train.jsonl",
        eval=data_dir / "test.jsonl",
        output_dir=Path(settings.output_dir) / name,
        cache_dir=cache / "references",
        data={"max_length": settings.max_length, "seed": settings.seed},
        loss={"beta": settings.beta},
        lora={"enabled": True, "r": settings.lora_r, "alpha": 2 * settings.lora_r, "dropout": 0.0},
        training={
            "per_device_train_batch_size": settings.batch_size,
            "per_device_eval_batch_size": 8,
            "num_train_epochs": settings.epochs,
            "learning_rate": settings.learning_rate,
            "logging_steps": 2,
            "save_strategy": "epoch",
            "save_total_limit": 1,
            "seed": settings.seed,
            "disable_tqdm": False,
        },
    )


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Fetch models, write data, train DPO and MRPO, evaluate, report. Returns the results (also in results.json)."""
    from mrpo.demo.models import GEMMA3, SMOLLM2, default_cache_dir, ensure_demo_model
    from mrpo.demo.pairs import write_demo_data
    from mrpo.evaluation import format_table
    from mrpo.pipeline import run_evaluate, run_train
    from mrpo.report import write_report
    from mrpo.rundir import FINAL_DIR

    started = time.perf_counter()
    output = Path(settings.output_dir)
    cache = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    _say("1/5 models")
    policy = settings.policy or str(ensure_demo_model(SMOLLM2, cache))
    external = settings.external or str(ensure_demo_model(GEMMA3, cache))
    _say(f"    policy + initialising reference: {policy}\n    external reference: {external}")

    _say("2/5 data")
    train_path, test_path = write_demo_data(
        output / "data", seed=settings.seed, train_pairs=settings.train_pairs, test_pairs=settings.test_pairs
    )
    _say(f"    {train_path} ({settings.train_pairs} pairs), {test_path} ({settings.test_pairs} pairs)")

    configs = {
        "dpo": demo_config(settings, "dpo", policy, {"init": policy}, cache),
        "mrpo": demo_config(settings, "mrpo", policy, {"init": policy, "external": external}, cache),
    }
    timings = {}
    for step, (name, config) in enumerate(configs.items(), start=3):
        _say(f"{step}/5 train {name.upper()} (K = {len(config.references)}); references come from the cache")
        begin = time.perf_counter()
        # The demo's runs are its own output: a second `make demo` replaces them (a user's run is refused).
        run_train(config, overwrite=True)
        timings[f"train_{name}_s"] = round(time.perf_counter() - begin, 1)

    _say("5/5 evaluate on the held-out pairs")
    begin = time.perf_counter()
    # Each run is measured against its own references. The start is scored once, with the MRPO run (against its
    # virtual reference, so the label-aware row shows what a model that learned nothing scores there).
    final = {name: str(Path(config.training.output_dir) / FINAL_DIR) for name, config in configs.items()}
    (dpo,), _ = run_evaluate(configs["dpo"], checkpoints={"dpo": final["dpo"]})
    (start, mrpo), _ = run_evaluate(configs["mrpo"], checkpoints={"start": None, "mrpo": final["mrpo"]})
    timings["evaluate_s"] = round(time.perf_counter() - begin, 1)
    columns = [start, dpo, mrpo]
    table = format_table(columns)
    report = write_report(
        [configs["dpo"].training.output_dir, configs["mrpo"].training.output_dir], output / "report"
    )
    timings["total_s"] = round(time.perf_counter() - started, 1)
    results = {
        "models": {"policy": policy, "external": external},
        "settings": asdict(settings),
        "metrics": {column.label: asdict(column) for column in columns},
        "timings": timings,
        "report": str(report),
    }
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print("\n" + table)
    print(f"\nreport: {report}\nresults: {output / 'results.json'}\ntime: {timings['total_s']:.0f} s")
    return results


def _say(message: str) -> None:
    print(message, flush=True)
