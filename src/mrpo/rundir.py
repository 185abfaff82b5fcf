"""The layout of a run directory (``training.output_dir``): what is written where, by whom, read back by whom.

mrpo_config.yaml     the resolved config                      written by train, read by report / evaluate
metrics.jsonl        one JSON object per Trainer log line     train; report
diagnostics.jsonl    live warnings, one per condition         train (trainer.DiagnosticsCallback); report
data_summary.json    rows read, pairs used, drops             train; report
eval_results.json    held-out metrics                         evaluate; report
inspect.json         the reference audit                      inspect; report
suspect_pairs.jsonl  pairs the references contradict          inspect
checkpoint-N/        Trainer checkpoints                      train (--resume reads them)
final/               the trained model or adapter             train; evaluate
merged/              LoRA merged into the base (optional)     train
report.md, *.png     the report                               report
"""

import json
import re
from pathlib import Path

CONFIG_FILE = "mrpo_config.yaml"
METRICS_FILE = "metrics.jsonl"
DIAGNOSTICS_FILE = "diagnostics.jsonl"
DATA_SUMMARY_FILE = "data_summary.json"
EVAL_RESULTS_FILE = "eval_results.json"
INSPECT_FILE = "inspect.json"
SUSPECTS_FILE = "suspect_pairs.jsonl"
FINAL_DIR = "final"
MERGED_DIR = "merged"
REPORT_FILE = "report.md"

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"


def checkpoint_problem(directory: Path) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None when it is complete.

    The Trainer writes ``trainer_state.json`` last (after the model, optimizer, scheduler and RNG states), so a
    checkpoint whose state file is missing or unreadable was cut while being saved.
    """
    state = directory / TRAINER_STATE_FILE
    if not state.is_file():
        return f"no {TRAINER_STATE_FILE} (cut while being saved)"
    try:
        content = json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE_FILE} is not valid JSON (cut while being written)"
    if not isinstance(content, dict) or not isinstance(content.get("global_step"), int):
        return f"{TRAINER_STATE_FILE} has no global_step"
    return None


def latest_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete ``checkpoint-N`` in a run directory, and the newer incomplete ones it skipped (with
    why). Nothing is deleted."""
    checkpoints = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            match = CHECKPOINT_PATTERN.match(child.name)
            if match and child.is_dir():
                checkpoints.append((int(match.group(1)), child))
    skipped = []
    for _, directory in sorted(checkpoints, reverse=True):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory, skipped
        skipped.append((directory, problem))
    return None, skipped
