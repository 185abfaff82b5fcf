"""`mrpo train` end to end (two references of different families and tokenizers, conversational pairs, resume),
and the documented errors for bad configs and bad caches: exit code 2 and one line, no traceback."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from mrpo.cli import main
from mrpo.config.schema import DataConfig, LoraConfig, MRPOConfig, PolicyConfig, load_config
from mrpo.errors import CacheError, ConfigError
from mrpo.models import load_policy
from mrpo.references import ReferenceCache
from tiny_models import bpe_tokenizer, save_model_dir

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trainer_worker as setup  # noqa: E402


def write_config(paths: dict[str, Path], name: str, **sections) -> Path:
    config = {
        "policy": {"model": str(paths["llama"]), "dtype": "float32"},
        "references": [
            {"name": "init", "model": str(paths["llama"]), "dtype": "float32"},
            {"name": "gemma", "model": str(paths["gemma"]), "dtype": "float32"},
        ],
        "data": {"train": str(paths["train"]), "eval": str(paths["train"])},
        "loss": {"beta": 0.1},
        "training": {
            "output_dir": str(paths["root"] / name),
            "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 4,
            "max_steps": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "learning_rate": 0.1,
            "optim": "sgd",
            "use_cpu": True,
            "disable_tqdm": True,
        },
        "cache_dir": str(paths["root"] / "cache"),
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    path = paths["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_end_to_end_then_resume(run_setup, capsys):
    config = write_config(run_setup, "run")
    run_dir = run_setup["root"] / "run"
    assert main(["train", str(config)]) == 0
    assert "final model:" in capsys.readouterr().out

    assert (run_dir / "mrpo_config.yaml").is_file()
    assert load_config(run_dir / "mrpo_config.yaml").references[1].name == "gemma"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (run_dir / "final" / "config.json").is_file()
    records = read_metrics(run_dir)
    train_steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_steps] == [1, 2, 3, 4]
    for name in (
        "rewards/accuracies",
        "rewards/margins",
        "alpha/ref1",
        "alpha/ref2",
        "ctro/clip_rate",
        "ref2/margin",
    ):
        assert all(name in r for r in train_steps), name
    assert all(r["alpha/ref1"] + r["alpha/ref2"] == pytest.approx(1.0, abs=1e-6) for r in train_steps)
    evaluation = [r for r in records if "eval_loss" in r]
    assert len(evaluation) == 1 and "eval_rewards/accuracies" in evaluation[0]
    summary = json.loads((run_dir / "data_summary.json").read_text())
    assert summary["train"]["pairs_used"] == 4

    # --resume: the latest checkpoint of the output directory, continued to step 6.
    assert main(["train", str(config), "training.max_steps=6", "--resume"]) == 0
    resumed = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoint-6").is_dir()
    assert yaml.safe_load((run_dir / "mrpo_config.yaml").read_text())["training"]["max_steps"] == 6


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    # transformers' own progress bars ("Loading weights ...") also go to stderr; ours is the one "mrpo" line.
    lines = [line for line in captured.err.splitlines() if line.startswith("mrpo ")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("mrpo train: error: ")
    return lines[0]


def test_cli_reports_a_config_error_in_one_line(run_setup, capsys):
    config = write_config(run_setup, "bad-weights", loss={"weights": [1.0, 2.0, 3.0]})
    line = one_line_error(capsys, ["train", str(config)])
    assert "'loss.weights'" in line and "3 numbers" in line


def test_cli_reports_a_missing_lora_target_in_one_line(run_setup, capsys):
    config = write_config(
        run_setup, "bad-lora", lora={"enabled": True, "target_modules": ["q_proj", "qkv_proj"]},
        training={"max_steps": 1},
    )  # fmt: skip
    line = one_line_error(capsys, ["train", str(config)])
    assert "'qkv_proj'" in line and "'q_proj'" not in line.split("no module named")[1].split(";")[0]


def test_cli_reports_a_data_error_in_one_line(run_setup, capsys):
    bad = Path(__file__).parent / "data" / "bad" / "missing_rejected.jsonl"
    config = write_config(run_setup, "bad-data", data={"train": str(bad), "eval": None})
    line = one_line_error(capsys, ["train", str(config)])
    assert "missing_rejected.jsonl" in line


def test_cli_reports_a_cache_error_in_one_line(run_setup, capsys):
    # A reference whose tokenizer is local but whose model is neither local nor reachable offline.
    references = [
        {"name": "init", "model": str(run_setup["llama"]), "dtype": "float32"},
        {"name": "remote", "model": "no-such-org/no-such-model", "tokenizer": str(run_setup["llama"])},
    ]
    config = write_config(run_setup, "bad-cache", references=references)
    line = one_line_error(capsys, ["train", str(config)])
    assert "no-such-org/no-such-model" in line


def test_lora_target_the_model_lacks_is_a_config_error(run_setup):
    config = MRPOConfig(
        policy=PolicyConfig(model=str(run_setup["llama"]), dtype="float32"),
        data=DataConfig(train=str(run_setup["train"])),
        lora=LoraConfig(enabled=True, target_modules=["q_proj", "query_key_value"]),
    )
    with pytest.raises(ConfigError, match="no module named 'query_key_value'") as caught:
        load_policy(config)
    assert caught.value.key == "lora.target_modules"


def test_weights_length_must_match_the_references(run_setup):
    config = write_config(run_setup, "weights-k")
    with pytest.raises(ConfigError, match="has 1 numbers but there are 2 references") as caught:
        load_config(config, ["loss.weights=[1.0]"])
    assert caught.value.key == "loss.weights"


def test_cache_built_for_other_data_is_a_cache_error(run_setup, tmp_path):
    pairs = setup.load_records(setup.standard_records())
    reference = setup.initialising_reference(run_setup["llama"])
    dataset_cache = setup.build_dataset(pairs[:2], [reference], tmp_path / "cache")
    assert len(dataset_cache) == 2
    from mrpo.data.tokenization import tokenize_for_models
    from mrpo.references import precompute

    tokenized = tokenize_for_models(pairs[:2], [reference[1]], max_length=None)
    cache: ReferenceCache = precompute(
        [reference[0]],
        [reference[1]],
        tokenized.per_view,
        tmp_path / "cache",
        device="cpu",
        show_progress=False,
    )
    assert cache.reports[0].computed == 0  # served from the store the first build wrote
    other = pairs[5].pair_id
    with pytest.raises(CacheError, match="the cache was built for other data") as caught:
        cache.columns([pairs[0].pair_id, other])
    assert other in str(caught.value) and "'init'" in str(caught.value)


def test_lora_with_gradient_checkpointing_and_a_merged_copy(run_setup):
    config = write_config(
        run_setup,
        "lora-merged",
        lora={
            "enabled": True,
            "r": 4,
            "alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "save_merged": True,
        },
        training={
            "max_steps": 2,
            "gradient_checkpointing": True,
            "eval_strategy": "no",
            "save_strategy": "no",
        },
    )
    assert main(["train", str(config)]) == 0
    run_dir = run_setup["root"] / "lora-merged"
    assert (run_dir / "final" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_runs_are_reproducible_whatever_ran_before_in_the_process(run_setup):
    import torch

    config = write_config(
        run_setup, "seeded", lora={"enabled": True, "r": 4, "alpha": 8},
        training={"max_steps": 2, "eval_strategy": "no", "save_strategy": "no"},
    )  # fmt: skip
    assert main(["train", str(config)]) == 0
    first = [r["loss"] for r in read_metrics(run_setup["root"] / "seeded") if "loss" in r]
    torch.rand(1000)  # consume the global RNG, as a model conversion or an earlier run would
    assert main(["train", str(config), "--overwrite"]) == 0
    second = [r["loss"] for r in read_metrics(run_setup["root"] / "seeded") if "loss" in r]
    assert second == first


def test_cli_reports_a_model_path_that_does_not_exist_in_one_line(run_setup, capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")
    config = write_config(run_setup, "bad-model")
    line = one_line_error(capsys, ["train", str(config), f"references.1.model={missing}"])
    assert "references.1 (gemma)" in line and missing in line and "not a local directory" in line


def test_resume_after_a_crash_keeps_one_metric_line_per_step_and_the_true_mean_loss(run_setup):
    import shutil

    from mrpo.rundir import load_run

    config = write_config(run_setup, "crash", training={"max_steps": 4, "save_steps": 2})
    run_dir = run_setup["root"] / "crash"
    assert main(["train", str(config)]) == 0
    uninterrupted = [r for r in read_metrics(run_dir) if "loss" in r]
    (uninterrupted_summary,) = [r for r in read_metrics(run_dir) if "train_loss" in r]
    expected_mean = load_run(run_dir).mean_train_loss()
    assert expected_mean == pytest.approx(sum(r["loss"] for r in uninterrupted) / 4)
    # A crash after step 4 was logged but before checkpoint-4 was kept: the resume starts again from step 2.
    shutil.rmtree(run_dir / "checkpoint-4")
    shutil.rmtree(run_dir / "final")
    assert main(["train", str(config), "--resume"]) == 0
    resumed = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # no step twice
    for before, after in zip(uninterrupted, resumed, strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)
        # TRL's num_tokens: real tokens seen so far, carried through the resume by the saved trainer state.
        assert after["num_tokens"] == before["num_tokens"]
    counts = [r["num_tokens"] for r in uninterrupted]
    assert counts == sorted(counts) and len(set(counts)) == 4 and counts[0] > 0
    summaries = [r for r in read_metrics(run_dir) if "train_runtime" in r]
    assert len(summaries) == 1  # the interrupted run's end line is gone
    # The Trainer's own mean would cover only steps 3-4; the resumed run's end line averages all four, as the
    # report does and as the uninterrupted run's end line did.
    assert load_run(run_dir).mean_train_loss() == pytest.approx(expected_mean, rel=1e-6)
    assert summaries[0]["train_loss"] == pytest.approx(uninterrupted_summary["train_loss"], abs=1e-6)
    assert summaries[0]["train_loss"] == pytest.approx(expected_mean, abs=1e-6)


def test_resume_skips_checkpoints_cut_while_saving_and_keeps_them(run_setup, caplog):
    config = write_config(run_setup, "cut", training={"max_steps": 4, "save_steps": 2})
    run_dir = run_setup["root"] / "cut"
    assert main(["train", str(config)]) == 0
    (run_dir / "checkpoint-6").mkdir()  # killed right after creating the directory
    (run_dir / "checkpoint-4" / "trainer_state.json").unlink()  # killed before the state file, written last
    with caplog.at_level(logging.WARNING, logger="mrpo.preflight"):
        assert main(["train", str(config), "training.max_steps=6", "--resume"]) == 0
    assert "Skipping " + str(run_dir / "checkpoint-6") + ": no trainer_state.json" in caplog.text
    assert "Skipping " + str(run_dir / "checkpoint-4") in caplog.text
    assert "Resuming from " + str(run_dir / "checkpoint-2") in caplog.text
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoint-4").is_dir()  # never deleted silently (the Trainer re-saved it complete)


def test_resume_without_a_complete_checkpoint_fails_at_once_in_one_line(run_setup, capsys, monkeypatch):
    import mrpo.assemble
    import mrpo.pipeline

    def must_not_load(*args, **kwargs):
        raise AssertionError("the error must come before any loading")

    monkeypatch.setattr(mrpo.pipeline, "load_views", must_not_load)
    monkeypatch.setattr(mrpo.assemble, "load_views", must_not_load)
    config = write_config(run_setup, "nothing-to-resume", training={"max_steps": 2})
    (run_setup["root"] / "nothing-to-resume" / "checkpoint-3").mkdir(parents=True)
    line = one_line_error(capsys, ["train", str(config), "--resume"])
    assert "holds no complete checkpoint-N directory (incomplete: checkpoint-3)" in line
    line = one_line_error(capsys, ["train", str(config), "--resume", str(run_setup["root"] / "nowhere")])
    assert "cannot resume from it: it is not a directory" in line


def test_a_reference_with_fewer_positions_drops_longer_pairs_by_name_instead_of_crashing(
    run_setup, capsys, caplog
):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = bpe_tokenizer()
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=40, n_embd=16, n_layer=1, n_head=2)
    )
    gpt2_dir = save_model_dir(gpt2, tokenizer, run_setup["root"] / "gpt2-40")
    long_row = {
        "prompt": [
            {"role": "user", "content": "Please list every colour of the rainbow, in order, with care."}
        ],
        "chosen": [{"role": "assistant", "content": "Red, orange, yellow, green, blue, indigo and violet."}],
        "rejected": [{"role": "assistant", "content": "Red."}],
    }
    data = run_setup["root"] / "with-long.jsonl"
    rows = [*setup.conversational_records(), long_row]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = write_config(
        run_setup, "positions",
        references=[{"name": "init", "model": str(run_setup["llama"]), "dtype": "float32"},
                    {"name": "gpt2", "model": str(gpt2_dir), "dtype": "float32"}],
        data={"train": str(data), "eval": None}, training={"max_steps": 1},
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mrpo.splits"):
        assert main(["precompute", str(config)]) == 0
    assert (
        f"references.1 (gpt2) ({gpt2_dir}) has 40 positions, fewer than references.1.max_length = 1024"
        in caplog.text
    )
    printed = capsys.readouterr().out
    assert "kept 4 of 5 pairs" in printed and "1 longer than 40 tokens for gpt2" in printed


def test_a_mistyped_policy_with_explicit_lora_targets_is_one_line(run_setup, capsys):
    config = write_config(
        run_setup, "typo-policy", policy={"model": str(run_setup["root"] / "no-such-model"), "dtype": "float32"},
        lora={"enabled": True, "target_modules": ["q_proj"]},
    )  # fmt: skip
    line = one_line_error(capsys, ["train", str(config)])
    assert "policy: cannot load the model config" in line and "no-such-model" in line


def test_a_second_fresh_run_into_the_same_directory_is_refused_or_overwritten(run_setup, capsys):
    config = write_config(run_setup, "twice", training={"max_steps": 4, "save_steps": 2})
    run_dir = run_setup["root"] / "twice"
    assert main(["train", str(config)]) == 0
    before = (run_dir / "metrics.jsonl").read_text()
    line = one_line_error(capsys, ["train", str(config), "training.max_steps=2"])
    assert (
        f"{run_dir} already holds a run (mrpo_config.yaml, metrics.jsonl, final, checkpoint-2, checkpoint-4)"
        in line
    )
    assert "--resume" in line and "--overwrite" in line
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing was touched
    (run_dir / "notes.txt").write_text("mine")
    assert main(["train", str(config), "training.max_steps=2", "--overwrite"]) == 0
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == [1, 2]  # one run in the file, not three
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == [
        "checkpoint-2"
    ]  # the old checkpoint-4 is gone
    assert (run_dir / "notes.txt").read_text() == "mine"  # what the run did not write stays


def test_resume_refuses_a_change_to_the_maths(run_setup, capsys):
    config = write_config(run_setup, "maths", training={"max_steps": 2, "save_steps": 2})
    assert main(["train", str(config)]) == 0
    line = one_line_error(capsys, ["train", str(config), "--resume", "loss.beta=0.5", "training.max_steps=4"])
    assert (
        "--resume: these settings differ from the run being resumed" in line
        and "loss.beta: 0.1 -> 0.5" in line
    )
    line = one_line_error(capsys, ["train", str(config), "--resume", "training.learning_rate=0.2"])
    assert "training.learning_rate: 0.1 -> 0.2" in line
    # The length may change, and so may how a step is computed (a token budget), what is evaluated, or whether
    # the tokens are kept on disk.
    assert main(["train", str(config), "--resume", "training.max_steps=4", "policy.micro_batch_tokens=64",
                 "data.max_eval_pairs=2", "data.cache_tokenized=false"]) == 0  # fmt: skip


def test_a_missing_tracker_fails_at_once_with_the_extra_to_install(run_setup, capsys, monkeypatch):
    import mrpo.assemble
    import mrpo.pipeline

    for module in (mrpo.pipeline, mrpo.assemble):
        monkeypatch.setattr(module, "load_views", lambda *a, **k: pytest.fail("must fail before loading"))
    config = write_config(run_setup, "tracker", training={"max_steps": 1, "report_to": "tensorboard"})
    line = one_line_error(capsys, ["train", str(config)])
    assert "training.report_to='tensorboard' needs the tensorboard package" in line
    assert "pip install 'mrpo[tensorboard]'" in line


def test_ctrl_c_says_the_step_and_how_to_resume(run_setup, capsys, monkeypatch):
    from mrpo.trainer import MRPOTrainer

    original = MRPOTrainer.training_step

    def interrupted_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MRPOTrainer, "training_step", interrupted_at_step_3)
    config = write_config(run_setup, "ctrl-c", training={"max_steps": 4, "save_steps": 2})
    assert main(["train", str(config)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        f"mrpo train: error: interrupted at step 2 (the last complete checkpoint is checkpoint-2); resume with "
        f"`mrpo train {config} --resume`" in err
    )


def test_saved_config_reruns_from_anywhere_and_records_the_effective_learning_rate(
    run_setup, monkeypatch, tmp_path
):
    import os

    relative = os.path.relpath(run_setup["train"], run_setup["root"])
    monkeypatch.chdir(run_setup["root"])
    config = write_config(
        run_setup, "portable", data={"train": relative, "eval": None}, training={"max_steps": 1}
    )
    raw = yaml.safe_load(config.read_text())
    del raw["training"]["learning_rate"]  # the default
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 0
    saved = yaml.safe_load((run_setup["root"] / "portable" / "mrpo_config.yaml").read_text())
    assert saved["data"]["train"] == str(run_setup["train"].resolve())
    assert saved["training"]["learning_rate"] == 1e-6  # the effective value, written down
    assert saved["training"]["lr_scheduler_type"] == "linear" and saved["training"]["optim"] == "sgd"
    monkeypatch.chdir(tmp_path)  # elsewhere: the saved file reruns as it is
    assert main(["train", str(run_setup["root"] / "portable" / "mrpo_config.yaml"), "--overwrite"]) == 0


def test_the_adapter_loads_from_the_run_directory_and_has_a_model_card(run_setup):
    from peft import AutoPeftModelForCausalLM

    config = write_config(
        run_setup, "peft-dir", lora={"enabled": True, "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        training={"max_steps": 2, "save_steps": 2},
    )  # fmt: skip
    assert main(["train", str(config)]) == 0
    run_dir = run_setup["root"] / "peft-dir"
    model = AutoPeftModelForCausalLM.from_pretrained(run_dir)
    assert model.peft_config["default"].r == 2
    card = (run_dir / "README.md").read_text()
    assert "MRPO with K = 2 references" in card and "`gemma`" in card and "Mean training loss" in card
    assert "library_name: peft" in card and f'from_pretrained("{run_dir}")' in card


def test_precompute_shows_once_how_a_reference_without_chat_template_reads_a_pair(
    run_setup, caplog, monkeypatch
):
    import mrpo.splits

    monkeypatch.setattr(mrpo.splits, "_RENDERINGS_SHOWN", set())
    config = write_config(run_setup, "rendering")
    with caplog.at_level(logging.WARNING, logger="mrpo.splits"):
        assert main(["precompute", str(config)]) == 0
    shown = [r.getMessage() for r in caplog.records if "has no chat template" in r.getMessage()]
    assert len(shown) == 1  # the train and eval splits: said once
    assert shown[0].startswith("Reference 'gemma' has no chat template: it reads each pair as plain text")
    assert "'User: Capital of Spain?\\n\\nAssistant: Madrid." in shown[0]


# ----------------------------------------------------------------------------------------------------------------
# A run's life: short runs, interruptions (Ctrl-C, SIGTERM), resuming, a finished run, warnings


@pytest.mark.parametrize(
    ("max_steps", "logging_steps", "logged"),
    [(3, 10, [3]), (1, 10, [1]), (5, 2, [2, 4, 5])],
    ids=["shorter-than-one-interval", "one-step", "tail-after-the-last-interval"],
)
def test_the_last_step_is_logged_whatever_logging_steps_is(
    run_setup, capsys, max_steps, logging_steps, logged
):
    from mrpo.rundir import load_run

    name = f"short-{max_steps}-{logging_steps}"
    config = write_config(run_setup, name, data={"train": str(run_setup["train"]), "eval": None},
                          training={"max_steps": max_steps, "logging_steps": logging_steps, "save_strategy": "no"})  # fmt: skip
    run_dir = run_setup["root"] / name
    assert main(["train", str(config)]) == 0
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == logged
    (summary,) = [r for r in records if "train_loss" in r]
    assert summary["train_loss"] == pytest.approx(load_run(run_dir).mean_train_loss(), abs=1e-6)
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").is_file()


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C as training step ``step + 1`` begins (after step ``step`` was logged and, if due, saved)."""
    from mrpo.trainer import MRPOTrainer

    original = MRPOTrainer.training_step

    def interrupted(self, *args, **kwargs):
        if self.state.global_step == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MRPOTrainer, "training_step", interrupted)


def hinted_command(err: str) -> list[str]:
    import shlex

    (line,) = [line for line in err.splitlines() if line.startswith("mrpo train: error: ")]
    command = shlex.split(line.rsplit("`", 2)[1])
    assert command[:2] == ["mrpo", "train"]
    return command[1:]


def test_interrupted_before_any_checkpoint_the_hint_starts_over_and_works(run_setup, capsys, monkeypatch):
    config = write_config(run_setup, "early-stop", training={"max_steps": 4, "save_steps": 3})
    run_dir = run_setup["root"] / "early-stop"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 1)
        assert main(["train", str(config)]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 1 (no checkpoint was saved yet); start it again with " in err
    command = hinted_command(err)
    assert command == ["train", str(config), "--overwrite"]  # --resume would fail: nothing to resume from
    assert main(command) == 0  # run literally, it trains the run
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]


def test_the_resume_hint_repeats_every_override_and_resumes_the_same_run(run_setup, capsys, monkeypatch):
    config = write_config(run_setup, "hint-base", training={"max_steps": 2, "save_steps": 2})
    run_dir = run_setup["root"] / "hint-elsewhere"
    argv = ["train", str(config), "--output_dir", str(run_dir), "--max_steps", "6", "training.save_steps=3"]
    with monkeypatch.context() as patch:
        interrupt_at(patch, 4)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 4 (the last complete checkpoint is checkpoint-3); resume with " in err
    command = hinted_command(err)
    assert command[:2] == ["train", str(config)] and command[-1] == "--resume"
    assert {f"training.output_dir={run_dir}", "training.max_steps=6", "training.save_steps=3"} <= set(command)
    assert main(command) == 0  # run literally: the same directory, to the same length
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert not (run_setup["root"] / "hint-base").exists()


@pytest.mark.parametrize(
    "length", [{"max_steps": 4}, {"max_steps": -1, "num_train_epochs": 2}], ids=["max_steps", "epochs"]
)
def test_resuming_a_finished_run_does_nothing_and_says_so(run_setup, capsys, monkeypatch, length):
    import mrpo.pipeline

    name = f"finished-{len(length)}"
    config = write_config(run_setup, name, training={**length, "save_steps": 2})
    run_dir = run_setup["root"] / name
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    written = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*") if path.is_file()}
    monkeypatch.setattr(mrpo.pipeline, "load_views", lambda *a, **k: pytest.fail("nothing may be loaded"))
    assert main(["train", str(config), "--resume"]) == 0
    assert capsys.readouterr().out.startswith(f"run {run_dir} already finished at step 4; nothing to resume")
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*") if path.is_file()} == written
    # A longer run may still continue from there.
    monkeypatch.undo()
    assert main(["train", str(config), "--resume", "training.max_steps=5"]) == 0
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r][-2:] == [4, 5]


def test_sigterm_during_training_stops_like_ctrl_c_with_exit_code_143(run_setup, tmp_path):
    import os
    import signal
    import subprocess
    import time

    config = write_config(run_setup, "sigterm", data={"train": str(run_setup["train"]), "eval": None},
                          training={"max_steps": 100000, "save_steps": 2, "save_total_limit": 1})  # fmt: skip
    metrics = run_setup["root"] / "sigterm" / "metrics.jsonl"
    source = Path(__file__).resolve().parents[1] / "src"
    environment = {
        **os.environ,
        "PYTHONPATH": str(source),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "mrpo.cli", "train", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        # Step 3 logged: checkpoint-2 is complete (saved right after step 2's line).
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no metrics line in time"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mrpo ")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("mrpo train: error: terminated (SIGTERM) at step ")
    assert "(the last complete checkpoint is checkpoint-" in lines[0]
    assert lines[0].endswith(f"; resume with `mrpo train {config} --resume`")


@pytest.mark.slow  # three 2-process launches: about 2 min 20 s on 2 busy CPU cores
def test_fresh_two_process_runs_start_every_time(run_setup):
    """Only the main process claims a fresh run directory and writes its config; the other waits for it (each
    claiming it, the slower found "already holds a run" in about half the launches)."""
    import os
    import subprocess

    configs = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    source = Path(__file__).resolve().parents[1] / "src"
    environment = {**os.environ, "PYTHONPATH": str(source), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                   "TQDM_DISABLE": "1"}  # fmt: skip
    for attempt in range(3):
        name = f"two-processes-{attempt}"
        config = write_config(run_setup, name, data={"train": str(run_setup["train"]), "eval": None},
                              training={"max_steps": 2, "save_strategy": "no"})  # fmt: skip
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(configs / "ddp.yaml"),
                   "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(29100 + (os.getpid() + attempt) % 800),
                   "-m", "mrpo.cli", "train", str(config)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
        assert result.returncode == 0, (attempt, result.stderr[-3000:])
        run_dir = run_setup["root"] / name
        assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]
        assert (run_dir / "final" / "config.json").is_file()
