"""What ``mrpo train`` checks before it loads anything, so a mistake costs seconds, not minutes of loading.

- the run directory: a fresh run refuses one that holds another run (unless ``--overwrite``, which clears what that
  run wrote); ``--resume`` takes the newest complete checkpoint (naming the incomplete ones it skips) and refuses
  settings that would change the resumed run's maths, and finds a run that has already finished;
- the services the run talks to (``check_services``, which ``mrpo train --dry-run`` runs too): the trackers of
  ``training.report_to`` are installed, and ``training.push_to_hub`` has a Hub to push to (not offline, logged in,
  reachable) and a valid repository name. All before the run directory is touched.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from mrpo.config.schema import MRPOConfig
from mrpo.errors import ConfigError
from mrpo.rundir import TRAINER_STATE_FILE, checkpoint_problem, clear_run, latest_checkpoint, previous_run

logger = logging.getLogger(__name__)


def resume_checkpoint(output_dir: Path, resume: str | bool | None) -> str | None:
    """The checkpoint to resume from: ``resume=True`` takes the newest complete one in ``output_dir`` (saying which
    incomplete ones it skipped, and leaving them in place), a path must be a complete checkpoint."""
    if not resume:
        return None
    if resume is True:
        checkpoint, skipped = latest_checkpoint(output_dir)
        for directory, problem in skipped:
            logger.warning("Skipping %s: %s; it is left in place.", directory, problem)
        if checkpoint is None:
            found = f" (incomplete: {', '.join(d.name for d, _ in skipped)})" if skipped else ""
            raise ConfigError(
                f"--resume: {output_dir} holds no complete checkpoint-N directory{found}; train without --resume to "
                "start over, or give a checkpoint directory (--resume DIR)",
                key="training.resume_from_checkpoint",
            )
    else:
        checkpoint = Path(resume)
        problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "it is not a directory"
        if problem:
            raise ConfigError(
                f"--resume {resume}: cannot resume from it: {problem}", key="training.resume_from_checkpoint"
            )
    logger.warning("Resuming from %s.", checkpoint)
    return str(checkpoint)


def finished_step(checkpoint: str | None, effective: dict[str, Any]) -> int | None:
    """The step at which the run being resumed already ended, or None when it has steps left (or is not resumed).

    Its end is ``max_steps`` as now configured; for a run counted in epochs, the step count the saved state
    computed, when ``num_train_epochs`` is what it was. (The Trainer, resumed from a checkpoint at the last step,
    trains one more step at learning rate 0 and would rewrite final/.)
    """
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    end = effective.get("max_steps") or -1
    if end <= 0:
        if state.get("num_train_epochs") != effective.get("num_train_epochs"):
            return None
        end = state.get("max_steps") or -1
    step = state["global_step"]
    return step if 0 < end <= step else None


def claim_output_dir(output_dir: Path, *, overwrite: bool) -> None:
    """A fresh run writes only into a directory that holds no other run, or one it was told to overwrite."""
    found = previous_run(output_dir)
    if not found:
        return
    if not overwrite:
        raise ConfigError(
            f"{output_dir} already holds a run ({', '.join(found[:6])}): add --resume to continue it, --overwrite "
            "to replace it, or set training.output_dir to a new directory",
            key="training.output_dir",
        )
    removed = clear_run(output_dir)
    logger.warning("--overwrite: removed the previous run's %s from %s.", ", ".join(removed), output_dir)


MATHS_SECTIONS = ("policy", "references", "data", "loss", "lora")
"""Sections a resumed run must keep as they were: changing them changes what the run computes..."""
HOW_NOT_WHAT = re.compile(
    r"^(policy\.(attn_implementation|padding_free|prefix_shared|pad_to_multiple_of|compile|micro_batch_tokens)"
    r"|references\.\d+\.(batch_tokens|prefix_shared|hash_weights)"
    r"|data\.(eval|eval_split|max_eval_pairs|cache_tokenized|num_proc))$"
)
"""...except these keys, which change how it is computed or what is evaluated, not what is trained."""


def check_resumable(saved_file: Path, config: MRPOConfig, effective: dict[str, Any]) -> None:
    """Refuse to resume with settings that change the run's maths (the saved config says what it used)."""
    if not saved_file.is_file():
        return  # a checkpoint given from elsewhere: nothing to compare with
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    current = config.to_dict()
    changes = []
    for section in MATHS_SECTIONS:
        before, after = _flatten(saved.get(section), section), _flatten(current.get(section), section)
        changes += [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(set(before) | set(after))
                    if before.get(key) != after.get(key) and not HOW_NOT_WHAT.match(key)]  # fmt: skip
    saved_training = saved.get("training") or {}
    changes += [
        f"training.{key}: {saved_training[key]!r} -> {value!r}"
        for key, value in effective.items()
        if key in saved_training
        and key not in ("max_steps", "num_train_epochs")
        and saved_training[key] != value
    ]
    if changes:
        raise ConfigError(
            f"--resume: these settings differ from the run being resumed ({saved_file}): {'; '.join(changes)}. "
            "They would change its maths from the checkpoint on; resume with the run's own settings (max_steps and "
            "num_train_epochs may change), or start a new run in another directory",
            key=changes[0].split(":")[0],
        )


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}.{key}").items()}
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return {
            k: v for index, item in enumerate(value) for k, v in _flatten(item, f"{prefix}.{index}").items()
        }
    return {prefix: value}


TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "trackio": ("trackio",),
}
TRACKER_EXTRAS = {"tensorboard": "pip install 'mrpo[tensorboard]'"}


def check_trackers(config: MRPOConfig) -> None:
    """Every ``training.report_to`` integration must be importable: say so now, not after minutes of loading."""
    report_to = config.training.to_dict().get("report_to") or []
    for tracker in [report_to] if isinstance(report_to, str) else list(report_to):
        modules = TRACKER_PACKAGES.get(tracker)
        if modules and not any(importlib.util.find_spec(module) for module in modules):
            install = TRACKER_EXTRAS.get(tracker, f"pip install {modules[0]}")
            raise ConfigError(
                f"training.report_to={tracker!r} needs the {modules[0]} package, which is not installed: "
                f"{install} (or set training.report_to=none)",
                key="training.report_to",
            )


def check_services(config: MRPOConfig) -> None:
    """Everything outside the process the run will use: its trackers and the Hub (``check_trackers``,
    ``check_hub``). Run before any write, and by ``mrpo train --dry-run``."""
    check_trackers(config)
    check_hub(config)


def check_hub(config: MRPOConfig) -> None:
    """``training.push_to_hub``: the Hub must be online, the user logged in and the repository name valid; said now
    in one line, not as a traceback from the Trainer after the run directory exists."""
    training = config.training.to_dict()
    if not training.get("push_to_hub"):
        return
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    key, later = (
        "training.push_to_hub",
        "or set training.push_to_hub=false and upload final/ later with `hf upload`",
    )
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{key}=true needs the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset it, {later}", key=key
        )
    repo = training.get("hub_model_id") or Path(training["output_dir"]).absolute().name
    try:
        validate_repo_id(repo)
    except HFValidationError as error:
        named = (
            "training.hub_model_id"
            if training.get("hub_model_id")
            else f"the output directory's name ({repo!r})"
        )
        raise ConfigError(
            f"{key}=true: {named} is not a valid Hub repository name ({str(error).split('.')[0]}); set "
            "training.hub_model_id=USER/NAME",
            key="training.hub_model_id",
        ) from None
    token = training.get("hub_token") or get_token()
    if not token:
        raise ConfigError(
            f"{key}=true needs a Hub login: run `hf auth login` or set HF_TOKEN, {later}", key=key
        )
    try:
        HfApi().whoami(token=token)
    except Exception as error:  # no network, a refused token, a proxy: the reason, in one line
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"{key}=true: the Hub cannot be reached with this login ({reason}); {later}", key=key
        ) from None
