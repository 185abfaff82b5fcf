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


def test_trl_style_flags_become_dotted_overrides():
    from mrpo.cli import flags_to_overrides

    options = {"--resume", "--overwrite", "--config", "-h", "--help"}
    argv, notes = flags_to_overrides(options, ["x.yaml", "--beta", "0.2", "--learning_rate=1e-6", "--resume"])
    assert argv == ["x.yaml", "loss.beta=0.2", "training.learning_rate=1e-6", "--resume"]
    assert notes == [
        "--beta 0.2 read as loss.beta=0.2",
        "--learning_rate 1e-6 read as training.learning_rate=1e-6",
    ]
    assert flags_to_overrides(options, ["--loss.eps", "0.3", "--lora.enabled"])[0] == [
        "loss.eps=0.3",
        "lora.enabled=true",
    ]


def test_ambiguous_and_unknown_flags_say_what_to_write(capsys):
    assert main(["train", "x.yaml", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "option --seed: it could be data.seed or training.seed" in err
    assert main(["train", "x.yaml", "--betta", "0.2"]) == 2
    assert "no config key is called 'betta' — did you mean 'beta'?" in capsys.readouterr().err


def test_config_as_an_option_and_a_missing_config(tmp_path, capsys, monkeypatch):
    import mrpo.pipeline

    seen = []
    monkeypatch.setattr(mrpo.pipeline, "run_precompute", lambda config: seen.append(config) or {})
    config = _evaluate_config(tmp_path)
    assert main(["precompute", "--config", str(config), "loss.beta=0.3"]) == 0
    assert seen[-1].loss.beta == 0.3
    assert main(["precompute", "--beta", "0.4", "--config", str(config)]) == 0
    assert seen[-1].loss.beta == 0.4
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "a config file is needed: mrpo train CONFIG.yaml [KEY=VALUE ...] (or --config CONFIG.yaml)" in err
    assert "KEY=VALUE is required" not in err and "required" not in err


def test_overrides_may_stand_anywhere():
    from mrpo.cli import build_parser, overrides_after_config

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    arrange = lambda *argv: overrides_after_config(train, list(argv))  # noqa: E731
    assert arrange("x.yaml", "--resume", "loss.beta=0.5", "a.b=1") == [
        "x.yaml",
        "loss.beta=0.5",
        "a.b=1",
        "--resume",
    ]
    assert arrange("x.yaml", "--resume", "ckpt", "a.b=1") == ["x.yaml", "a.b=1", "--resume", "ckpt"]
    assert arrange("--config", "x.yaml", "a.b=1", "--overwrite") == [
        "a.b=1",
        "--config",
        "x.yaml",
        "--overwrite",
    ]
    evaluate = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    assert overrides_after_config(evaluate, ["x.yaml", "--lm-eval-tasks", "t1", "t2", "a.b=1"]) == [
        "x.yaml", "a.b=1", "--lm-eval-tasks", "t1", "t2",
    ]  # fmt: skip
