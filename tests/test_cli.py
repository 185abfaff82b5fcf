"""The `mrpo` console script: help and version work from an installed package."""

import subprocess
import sys

from mrpo import __version__
from mrpo.cli import main


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as stop:
        assert stop.code == 0
    assert capsys.readouterr().out.strip() == f"mrpo {__version__}"
    assert main([]) == 0
    assert "Multi-Reference Preference Optimization" in capsys.readouterr().out


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "mrpo.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: mrpo" in result.stdout


def _evaluate_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        f"policy: {{model: models/start}}\ndata: {{train: t.jsonl, eval: e.jsonl}}\n"
        f"training: {{output_dir: {tmp_path / 'run'}}}\n"
    )
    return path


def test_evaluate_no_start_is_honoured_without_checkpoints(tmp_path, monkeypatch, capsys):
    import mrpo.pipeline
    from mrpo.evaluation import HeldOutMetrics

    asked = []

    def fake_evaluate(config, *, checkpoints, output):
        asked.append(dict(checkpoints))
        metrics = dict.fromkeys(
            ["policy_accuracy", "policy_accuracy_per_token", "reward_accuracy_initialising",
             "reward_accuracy_virtual", "policy_margin", "reward_margin_initialising", "reward_margin_virtual",
             "clip_rate"], 0.5)  # fmt: skip
        return [
            HeldOutMetrics(label, str(path), 1, metrics, False) for label, path in checkpoints.items()
        ], "out"

    monkeypatch.setattr(mrpo.pipeline, "run_evaluate", fake_evaluate)
    config = _evaluate_config(tmp_path)
    (tmp_path / "run" / "final").mkdir(parents=True)
    assert main(["evaluate", str(config)]) == 0
    assert list(asked[-1]) == ["start", "run"]
    assert main(["evaluate", str(config), "--no-start"]) == 0
    assert list(asked[-1]) == ["run"]  # was ignored unless --checkpoint was given too
    (tmp_path / "run" / "final").rmdir()
    assert main(["evaluate", str(config), "--no-start"]) == 2
    assert "--no-start leaves nothing to evaluate" in capsys.readouterr().err
