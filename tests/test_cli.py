"""The `mrpo` console script: help and version work from an installed package."""

import subprocess
import sys

import pytest

from mrpo import __version__
from mrpo.cli import main
from mrpo.errors import ConfigError


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


TRAIN_OPTIONS = {"--resume": "?", "--overwrite": 0, "--config": None, "-h": 0, "--help": 0}


def test_trl_style_flags_become_dotted_overrides():
    from mrpo.flags import read_command_line

    line = read_command_line(TRAIN_OPTIONS, ["x.yaml", "--beta", "0.2", "--learning_rate=1e-6", "--resume"])
    assert (line.arguments, line.overrides) == (
        ["x.yaml", "--resume"],
        ["loss.beta=0.2", "training.learning_rate=1e-6"],
    )
    assert line.notes == [
        "--beta 0.2 read as loss.beta=0.2",
        "--learning_rate 1e-6 read as training.learning_rate=1e-6",
    ]
    assert read_command_line(TRAIN_OPTIONS, ["--loss.eps", "0.3", "--lora.enabled"]).overrides == [
        "loss.eps=0.3",
        "lora.enabled=true",
    ]
    assert read_command_line(TRAIN_OPTIONS, ["--max_steps", "-1"]).overrides == ["training.max_steps=-1"]


def test_a_bare_bool_flag_is_true_and_leaves_the_next_token_alone():
    from mrpo.flags import read_command_line

    read = lambda *argv: read_command_line(TRAIN_OPTIONS, list(argv))  # noqa: E731
    line = read("x.yaml", "--gradient_checkpointing", "--max_steps", "3")
    assert line.overrides == ["training.gradient_checkpointing=true", "training.max_steps=3"]
    line = read("--gradient_checkpointing", "x.yaml", "--lora.enabled", "loss.beta=0.2")
    assert line.arguments == ["x.yaml"]  # the config was swallowed as the flag's value
    assert line.overrides == ["training.gradient_checkpointing=true", "lora.enabled=true", "loss.beta=0.2"]
    assert read("--gradient_checkpointing", "false", "--padding_free", "True").overrides == [
        "training.gradient_checkpointing=false",
        "policy.padding_free=True",
    ]
    with pytest.raises(
        ConfigError, match=r"option --beta needs a value: --beta VALUE \(or loss.beta=VALUE\)"
    ):
        read("x.yaml", "--beta")


def test_max_length_means_the_data_key_and_a_reference_only_key_still_works(tmp_path, monkeypatch):
    import mrpo.pipeline
    from mrpo.flags import keys_named

    assert keys_named("max_length") == ["data.max_length"]
    assert keys_named("dtype") == ["policy.dtype"]
    assert keys_named("batch_tokens") == ["references.0.batch_tokens"]
    seen = []
    monkeypatch.setattr(mrpo.pipeline, "run_precompute", lambda config: seen.append(config) or {})
    assert main(["precompute", str(_evaluate_config(tmp_path)), "--max_length", "256"]) == 0
    assert seen[-1].data.max_length == 256 and seen[-1].references[0].max_length is None


def test_evaluate_checkpoint_takes_a_labelled_value_after_a_space(tmp_path, monkeypatch):
    import mrpo.evaluation
    import mrpo.pipeline

    monkeypatch.setattr(mrpo.evaluation, "format_table", lambda results: "")

    asked = []
    monkeypatch.setattr(
        mrpo.pipeline,
        "run_evaluate",
        lambda config, *, checkpoints, output: asked.append(checkpoints) or ([], "o"),
    )
    config = _evaluate_config(tmp_path)
    odd = tmp_path / "lr=1e-4"  # a directory whose name holds an "=" is a path, not LABEL=DIR
    odd.mkdir()
    assert (
        main(
            [
                "evaluate",
                str(config),
                "--checkpoint",
                "dpo=/runs/dpo",
                "--checkpoint",
                str(odd),
                "loss.beta=0.3",
            ]
        )
        == 0
    )
    assert asked[-1] == {"start": None, "dpo": "/runs/dpo", "lr=1e-4": str(odd)}


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
    from mrpo.flags import read_command_line

    def arrange(*argv, options=TRAIN_OPTIONS):
        line = read_command_line(options, list(argv))
        return line.arguments, line.overrides

    assert arrange("x.yaml", "--resume", "loss.beta=0.5", "a.b=1") == (
        ["x.yaml", "--resume"],
        ["loss.beta=0.5", "a.b=1"],
    )
    assert arrange("x.yaml", "--resume", "ckpt", "a.b=1") == (["x.yaml", "--resume", "ckpt"], ["a.b=1"])
    assert arrange("x.yaml", "--resume=loss.beta=0.5") == (["x.yaml", "--resume"], ["loss.beta=0.5"])
    assert arrange("x.yaml", "--resume=ckpt") == (["x.yaml", "--resume=ckpt"], [])
    assert arrange("--config", "x.yaml", "a.b=1", "--overwrite") == (
        ["--config", "x.yaml", "--overwrite"],
        ["a.b=1"],
    )
    evaluate = {"--lm-eval-tasks": "+", "--checkpoint": None}
    assert arrange("x.yaml", "--lm-eval-tasks", "t1", "t2", "a.b=1", options=evaluate) == (
        ["x.yaml", "--lm-eval-tasks", "t1", "t2"], ["a.b=1"],
    )  # fmt: skip


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_push_to_hub_offline_is_one_line_before_the_run_directory_exists(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    config, run_dir = _evaluate_config(tmp_path), tmp_path / "run"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["train", str(config), "training.push_to_hub=true"]) == 2
    assert "training.push_to_hub=true needs the Hugging Face Hub, but HF_HUB_OFFLINE is set" in one_line(
        capsys
    )
    assert not run_dir.exists()  # nothing half-made that would refuse the next run
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["train", str(config), "training.push_to_hub=true"]) == 2
    assert "needs a Hub login: run `hf auth login` or set HF_TOKEN" in one_line(capsys)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_token")

    def no_network(self, token=None):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", no_network)
    assert (
        main(["train", str(config), "training.push_to_hub=true", "--dry-run"]) == 2
    )  # the dry run checks it too
    assert "the Hub cannot be reached with this login (Failed to resolve 'huggingface.co')" in one_line(
        capsys
    )
    assert (
        main(
            ["train", str(config), "training.push_to_hub=true", f"training.output_dir={tmp_path / 'my run'}"]
        )
        == 2
    )
    line = one_line(capsys)
    assert "the output directory's name ('my run') is not a valid Hub repository name" in line
    assert "set training.hub_model_id=USER/NAME" in line
    assert not run_dir.exists() and not (tmp_path / "my run").exists()


def test_dry_run_checks_the_trackers_as_train_does(tmp_path, monkeypatch, capsys):
    import importlib.util

    import mrpo.preflight

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        mrpo.preflight.importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("tensorboard") else find_spec(name, *a),
    )
    config = _evaluate_config(tmp_path)
    assert main(["train", str(config), "--dry-run", "training.report_to=tensorboard"]) == 2
    assert "training.report_to='tensorboard' needs the tensorboard package" in one_line(capsys)
