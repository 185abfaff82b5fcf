"""A resumable grid of runs, shared by the studies: one directory per run, ``result.json`` written last."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
"""Written last and atomically: a run directory with it is finished, one without it is redone."""


def is_finished(run_dir: Path) -> bool:
    return (run_dir / RESULT_FILE).exists()


def write_json_atomic(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_grid(
    runs: Sequence[Any],
    output_dir: Path,
    runner: Callable[[Any, Path], dict[str, Any]],
    *,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every unfinished run (a directory without ``result.json`` is cleared and redone); return all results.

    ``runs`` are dataclasses with a ``name`` (their directory under ``output_dir``); a result is the run's fields,
    what ``runner(run, run_dir)`` returned, and the seconds it took.
    """
    results = []
    for index, run in enumerate(runs, start=1):
        run_dir = output_dir / run.name
        if is_finished(run_dir):
            log(f"[{index}/{len(runs)}] {run.name}: finished, skipped")
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)  # an interrupted run: its partial outputs would mix with the new ones
            run_dir.mkdir(parents=True)
            log(f"[{index}/{len(runs)}] {run.name}: running")
            begin = time.perf_counter()
            result = {**dataclasses.asdict(run), **runner(run, run_dir)}
            result["seconds"] = round(time.perf_counter() - begin, 1)
            write_json_atomic(run_dir / RESULT_FILE, result)
            log(f"    done in {result['seconds']:.0f} s")
        results.append(json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8")))
    return results


def check_settings(output_dir: Path, settings: Any, resume: bool) -> None:
    """A study's settings are fixed for its output directory: another directory for other settings, and ``resume``
    to continue one that holds finished runs. ``settings`` is a dataclass with ``to_json`` / ``from_json``."""
    saved = output_dir / "settings.json"
    if saved.exists():
        previous = type(settings).from_json(json.loads(saved.read_text(encoding="utf-8")))
        if previous != settings:
            raise SystemExit(
                f"{output_dir} holds a study with other settings ({saved}); use another --output-dir or the same flags"
            )
        if not resume and any(output_dir.glob(f"**/{RESULT_FILE}")):
            raise SystemExit(
                f"{output_dir} holds finished runs: pass --resume to continue, or another --output-dir"
            )
    write_json_atomic(saved, settings.to_json())


def record_invocation(output_dir: Path, command: str, runtime_s: float, runs_run: int) -> list[dict]:
    """Append this invocation to ``invocations.jsonl`` (what ran, how long) and return every one so far."""
    path = output_dir / "invocations.jsonl"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(
            json.dumps({"command": command, "runtime_s": round(runtime_s, 1), "runs_run": runs_run}) + "\n"
        )
    return read_jsonl(path)
