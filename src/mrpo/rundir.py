"""The layout of a run directory (``training.output_dir``): what is written where, by whom, and how it is read back
(``load_run``: the metrics one line per step, the evaluation, the audit and the live warnings).

mrpo_config.yaml     the resolved config                      written by train, read by report / evaluate
metrics.jsonl        one JSON object per Trainer log line     train; report
diagnostics.jsonl    live warnings, one per condition         train (diagnostics.DiagnosticsCallback); report
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
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mrpo.errors import ReportError
from mrpo.formatting import is_number, percent, plain, signed

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

RUN_FILES = (
    CONFIG_FILE,
    METRICS_FILE,
    DIAGNOSTICS_FILE,
    DATA_SUMMARY_FILE,
    EVAL_RESULTS_FILE,
    REPORT_FILE,
    "README.md",  # the model card
    "loss.png",
    "rewards.png",
    "alpha.png",
    "ctro.png",
    "heldout.png",
    # the LoRA adapter and tokenizer saved at the top, so the directory loads like a TRL output directory
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
"""The files a run writes at the top of its directory (besides checkpoint-N/, final/ and merged/). ``inspect.json``
and ``suspect_pairs.jsonl`` belong to ``mrpo inspect``, not to a run."""
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, FINAL_DIR)
"""Any of these (or a checkpoint-N directory) means the directory holds a run."""

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


# ----------------------------------------------------------------------------------------------------------------
# Reading a run directory back
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a run directory holds, read and sorted by step."""

    name: str
    """The run's name in legends and tables (its directory name)."""
    path: Path
    train: list[dict[str, Any]]
    """Train log lines (those with "loss"), one per step (the last one wins when a resumed run logged a step
    twice)."""
    eval: list[dict[str, Any]]
    """Eval log lines (keys prefixed "eval_"), one per step."""
    summary: dict[str, Any] = field(default_factory=dict)
    """The end-of-training line (train_runtime, train_loss, ...), if the run finished."""
    eval_results: dict[str, Any] | None = None
    data_summary: dict[str, Any] | None = None
    config_text: str | None = None
    config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    """Problems met while reading, shown in the report."""
    audit: dict[str, Any] | None = None
    """``mrpo inspect``'s inspect.json, when it was written into the run directory."""
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    """The live warnings training wrote (diagnostics.jsonl), in the order they fired."""

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """Steps and values of one logged metric; "eval_" keys come from the eval lines."""
        rows = self.eval if key.startswith("eval_") else self.train
        points = [(row["step"], row[key]) for row in rows if is_number(row.get(key))]
        return [float(step) for step, _ in points], [float(value) for _, value in points]

    def has(self, key: str) -> bool:
        return bool(self.series(key)[0])

    @property
    def num_references(self) -> int:
        """K: from the config, else from the logged alpha/ref{k} keys (0 when neither tells)."""
        if self.config and isinstance(self.config.get("references"), list):
            return len(self.config["references"])
        return len(self.alpha_keys())

    def alpha_keys(self) -> list[str]:
        keys = {
            key
            for row in self.train + self.eval
            for key in row
            if key.startswith(("alpha/ref", "eval_alpha/ref"))
        }
        numbers = sorted({int(key.rsplit("ref", 1)[1]) for key in keys if key.rsplit("ref", 1)[1].isdigit()})
        return [f"alpha/ref{k}" for k in numbers]

    def reference_name(self, k: int) -> str | None:
        """The configured name of reference k (1-based), when the config is there."""
        references = (self.config or {}).get("references")
        if isinstance(references, list) and 0 < k <= len(references) and isinstance(references[k - 1], dict):
            return references[k - 1].get("name")
        return None

    def mean_train_loss(self) -> float | None:
        """The loss averaged over every optimizer step, from the logged lines (see ``mean_train_loss``)."""
        return mean_train_loss(self.train)

    def mean_clip_rate(self) -> tuple[float, str] | None:
        """The mean CTRO clip rate over the train log lines (else the eval lines), and which split it is from."""
        for key, split in (("ctro/clip_rate", "train"), ("eval_ctro/clip_rate", "eval")):
            values = self.series(key)[1]
            if values:
                return sum(values) / len(values), split
        return None


def mean_train_loss(rows: Iterable[dict[str, Any]]) -> float | None:
    """The loss averaged over every optimizer step, from train log lines (rows with a ``loss`` and a ``step``; the
    last one wins for a step logged twice): each line's loss is the mean over the steps since the previous line, so
    it counts for that many steps. The trainer's end-of-training ``train_loss`` and the report both use it, so a
    resumed run reports the mean an uninterrupted one would."""
    by_step = {
        row["step"]: row["loss"]
        for row in rows
        if is_number(row.get("loss")) and isinstance(row.get("step"), int)
    }
    total, previous = 0.0, 0
    for step in sorted(by_step):
        if step > previous:
            total += by_step[step] * (step - previous)
            previous = step
    return total / previous if previous else None


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; ``metrics.jsonl`` is required, the other files are optional."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(
            f"run directory {str(path)!r} does not exist (give the training.output_dir of a run)"
        )
    metrics_file = path / METRICS_FILE
    if not metrics_file.is_file():
        present = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise ReportError(
            f"run directory {str(path)!r} has no {METRICS_FILE} (it holds: {present}). `mrpo train` writes it "
            f"into training.output_dir as it logs; {METRICS_FILE} is required, {EVAL_RESULTS_FILE}, "
            f"{DATA_SUMMARY_FILE} and {CONFIG_FILE} are optional."
        )
    run = Run(name=path.resolve().name, path=path, train=[], eval=[])
    _read_metrics(metrics_file, run)
    if not run.train and not run.eval:
        raise ReportError(
            f"{metrics_file} holds no train or eval log line yet; report on the run once it has logged"
        )
    run.eval_results = _read_json(path / EVAL_RESULTS_FILE)
    run.audit = _read_json(path / INSPECT_FILE)
    diagnostics_file = path / DIAGNOSTICS_FILE
    if diagnostics_file.is_file():
        for number, line in enumerate(diagnostics_file.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                run.diagnostics.append(json.loads(line))
            except json.JSONDecodeError:
                run.notes.append(f"{DIAGNOSTICS_FILE}: line {number} is not JSON; skipped.")
    run.data_summary = _read_json(path / DATA_SUMMARY_FILE)
    config_file = path / CONFIG_FILE
    if config_file.is_file():
        run.config_text = config_file.read_text(encoding="utf-8")
        try:
            parsed = yaml.safe_load(run.config_text)
            run.config = parsed if isinstance(parsed, dict) else None
        except yaml.YAMLError as error:
            run.notes.append(f"{CONFIG_FILE} is not valid YAML ({error}); shown as is.")
    return run


def _read_metrics(metrics_file: Path, run: Run) -> None:
    lines = metrics_file.read_text(encoding="utf-8").splitlines()
    train: dict[int, dict[str, Any]] = {}
    evaluation: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # a run killed while writing leaves half a last line: skip it, say so
                run.notes.append(f"{METRICS_FILE}: skipped the unfinished last line {number}.")
                warnings.warn(f"{metrics_file}: skipping the unfinished last line {number}", stacklevel=3)
                continue
            raise ReportError(f"{metrics_file}, line {number}: not a JSON object ({error})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{metrics_file}, line {number}: expected a JSON object, got {line[:80]!r}")
        step = row.get("step")
        if not isinstance(step, int):
            raise ReportError(f"{metrics_file}, line {number}: no integer 'step' field")
        if any(key.startswith("eval_") for key in row):
            evaluation[step] = row
        elif "loss" in row:
            train[step] = row
        else:
            run.summary = row
    run.train = [train[step] for step in sorted(train)]
    run.eval = [evaluation[step] for step in sorted(evaluation)]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error}); rewrite it or remove it") from None
    if not isinstance(content, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return content


def previous_run(output_dir: Path) -> list[str]:
    """What in ``output_dir`` shows that a run already wrote there (names, for the message); empty when none."""
    if not output_dir.is_dir():
        return []
    found = [name for name in RUN_MARKERS if (output_dir / name).exists()]
    found += sorted(p.name for p in output_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.is_dir())
    return found


def clear_run(output_dir: Path) -> list[str]:
    """Remove what a run wrote into ``output_dir`` (``RUN_FILES``, checkpoints, final/, merged/); returns the
    names removed. Anything else in the directory is left alone."""
    import shutil

    removed = []
    for path in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        ours = (
            path.name in RUN_FILES
            or path.name in (FINAL_DIR, MERGED_DIR)
            or CHECKPOINT_PATTERN.match(path.name)
        )
        if not ours:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    return removed


def write_model_card(output_dir: Path, config: dict[str, Any], data_summary: dict[str, Any] | None) -> Path:
    """``README.md`` in the run directory: what was trained (method, references, data, settings) and what it
    measured (from the run's own metrics and evaluation), with Hub metadata; read by anyone who loads the model."""
    run = load_run(output_dir) if (output_dir / METRICS_FILE).is_file() else None
    references = config.get("references") or []
    policy, lora, loss = config["policy"], config.get("lora") or {}, config.get("loss") or {}
    saved = (run.config or {}).get("training") if run is not None else None
    training = {
        **(config.get("training") or {}),
        **(saved or {}),
    }  # the saved config has the effective values
    method = "DPO (one reference)" if len(references) == 1 else f"MRPO with K = {len(references)} references"
    base_model = hub_id_of(policy["model"])
    lines = [
        "---",
        f"library_name: {'peft' if lora.get('enabled') else 'transformers'}",
        *(
            [f"base_model: {base_model}"] if base_model else []
        ),  # the Hub wants a Hub id here, not a local path
        "tags: [mrpo, preference-optimization, dpo]",
        "---",
        "",
        f"# {output_dir.name}",
        "",
        f"Trained with [mrpo](https://arxiv.org/abs/2405.16388) (Multi-Reference Preference Optimization): {method}.",
        "",
        f"- Policy: `{policy['model']}`"
        + (f" (`{base_model}` on the Hub)" if base_model and base_model != policy["model"] else "")
        + ", "
        + (
            f"LoRA r {lora.get('r')}, alpha {lora.get('alpha')}, on {lora.get('target_modules')}"
            if lora.get("enabled")
            else "full fine-tuning"
        ),
        "- References: " + ", ".join(f"`{r['name']}` ({r['model']})" for r in references),
        "- Loss: " + ", ".join(f"{key} {value}" for key, value in loss.items()),
        f"- Training: learning rate {training.get('learning_rate')}, {_length_of_training(training)}, "
        f"batch {training.get('per_device_train_batch_size')} per device x "
        f"{training.get('gradient_accumulation_steps', 1)} accumulation",
    ]
    for split, summary in (data_summary or {}).items():
        lines.append(f"- Data ({split}): `{summary.get('source')}`, {summary.get('pairs_used')} pairs used")
    if run is not None:
        mean_loss = run.mean_train_loss()
        if mean_loss is not None:
            lines.append(f"- Mean training loss: {mean_loss:.4f} over {run.train[-1]['step']} steps")
        clip = run.mean_clip_rate()
        if clip is not None and len(references) > 1:
            lines.append(f"- Mean CTRO clip rate ({clip[1]}): {clip[0]:.1%}")
    if run is not None and run.eval:
        lines += ["", f"Held-out pairs at the end of training (step {run.eval[-1]['step']}):", ""]
        lines += held_out_table(run.eval[-1], [r.get("name") for r in references])
    if lora.get("enabled"):
        lines += [
            "",
            "Load it:",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{output_dir}")',
            "```",
        ]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _length_of_training(training: dict[str, Any]) -> str:
    """``"200 steps"`` when max_steps bounds the run (it overrides the epochs), else ``"2.0 epochs"``."""
    steps = training.get("max_steps")
    if is_number(steps) and steps > 0:
        return f"{int(steps)} steps"
    epochs = training.get("num_train_epochs")
    return f"{epochs} epochs" if is_number(epochs) else "transformers' default number of epochs"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CACHE_DIR = re.compile(r"^models--([\w.-]+)--([\w.-]+)$")


def hub_id_of(model: str) -> str | None:
    """The Hub id a policy came from: itself when it is one; for a local directory, the id its Hub cache folder
    (``models--ORG--NAME``) or its config's ``_name_or_path`` names; None when nothing says (a local model)."""
    path = Path(model)
    if not path.exists():
        return model if _HUB_ID.match(model) else None
    for part in reversed(path.resolve().parts):
        cached = _HUB_CACHE_DIR.match(part)
        if cached:
            return f"{cached.group(1)}/{cached.group(2)}"
    config = _read_json(path / "config.json") if path.is_dir() else None
    named = (config or {}).get("_name_or_path")
    if isinstance(named, str) and _HUB_ID.match(named) and not Path(named).exists():
        return named
    return None


_EVAL_NAMES = {
    "loss": ("loss", "plain"),
    "rewards/accuracies": ("reward accuracy (vs the virtual reference)", "rate"),
    "rewards/margins": ("reward margin (nats)", "signed"),
    "rewards/chosen": ("reward of the chosen answer", "signed"),
    "rewards/rejected": ("reward of the rejected answer", "signed"),
    "logps/chosen": ("policy log-prob of the chosen answer", "signed"),
    "logps/rejected": ("policy log-prob of the rejected answer", "signed"),
    "ctro/clip_rate": ("CTRO clip rate", "rate"),
    "ctro/eps_chosen": ("CTRO eps, chosen", "plain"),
    "ctro/eps_rejected": ("CTRO eps, rejected", "plain"),
}
_NOT_METRICS = {"runtime", "samples_per_second", "steps_per_second", "epoch"}


def held_out_table(record: dict[str, Any], reference_names: list[Any]) -> list[str]:
    """A logged evaluation (``eval_*`` keys) as a markdown table of named, formatted metrics."""
    formats = {"rate": percent, "signed": signed, "plain": plain}
    rows = []
    for key, value in record.items():
        name = key.removeprefix("eval_")
        if not key.startswith("eval_") or name in _NOT_METRICS or not is_number(value):
            continue
        label, kind = _EVAL_NAMES.get(name, (name, "plain"))
        alpha = re.fullmatch(r"alpha/ref(\d+)", name)
        if alpha:
            k = int(alpha.group(1))
            known = 0 < k <= len(reference_names) and reference_names[k - 1]
            label, kind = f"mean weight alpha of {f'`{known}`' if known else f'reference {k}'}", "plain"
        rows.append(f"| {label} | {formats[kind](value)} |")
    return ["| metric | value |", "|---|---|", *rows] if rows else ["(no metric logged)"]
