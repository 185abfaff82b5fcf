"""The error family: every user-caused error is an MRPOError that says what it is, and the CLI prints each in one
line with its exit code, whatever the command."""

from __future__ import annotations

import pytest

from mrpo import errors
from mrpo.cli import main

USER_ERRORS = [
    errors.ConfigError, errors.DataError, errors.CacheError, errors.ModelSourceError, errors.CollatorError,
    errors.TrainingError, errors.LMEvalError, errors.LMEvalNotInstalledError, errors.ReportError,
    errors.DemoModelError,
]  # fmt: skip


def test_every_user_error_is_an_mrpo_error_and_says_what_it_is():
    for error in USER_ERRORS:
        assert issubclass(error, errors.MRPOError), error
    # What an error is, not what catches it: a model that does not load is not a cache problem, an lm-eval
    # request is not a config key, an empty batch is not a missing dictionary key.
    assert not issubclass(errors.ModelSourceError, errors.CacheError)
    assert not issubclass(errors.LMEvalError, errors.ConfigError)
    assert not issubclass(errors.CollatorError, KeyError)
    assert str(errors.CollatorError("empty batch")) == "empty batch"  # KeyError quoted its message


def test_the_modules_raise_the_family_members():
    from mrpo import collator, lm_eval_bridge, models, references, report, trainer
    from mrpo.config import schema
    from mrpo.data import sources

    assert schema.ConfigError is errors.ConfigError and sources.DataError is errors.DataError
    assert references.CacheError is errors.CacheError and models.ModelSourceError is errors.ModelSourceError
    assert collator.CollatorError is errors.CollatorError and trainer.TrainingError is errors.TrainingError
    assert lm_eval_bridge.LMEvalError is errors.LMEvalError and report.ReportError is errors.ReportError


@pytest.mark.parametrize("error", USER_ERRORS)
def test_cli_prints_any_family_member_in_one_line_with_its_exit_code(error, monkeypatch, capsys):
    import mrpo.report

    def fail(*args, **kwargs):
        raise error("what went wrong, and what to do")

    monkeypatch.setattr(mrpo.report, "write_report", fail)
    code = main(["report", "some-run"])
    assert code == (1 if error is errors.TrainingError else 2)
    assert capsys.readouterr().err == "mrpo report: error: what went wrong, and what to do\n"


def test_weights_torch_refuses_to_unpickle_are_one_line_naming_the_file(tmp_path):
    import argparse

    import torch

    from mrpo.models import load_model
    from tiny_models import bpe_tokenizer, save_model_dir, tiny_llama

    directory = save_model_dir(tiny_llama(), bpe_tokenizer(), tmp_path / "model")
    for weights in directory.glob("*.safetensors"):
        weights.unlink()
    torch.save({"model.embed_tokens.weight": argparse.Namespace(a=1)}, directory / "pytorch_model.bin")
    with pytest.raises(errors.ModelSourceError) as caught:
        load_model(str(directory), torch.float32, torch.device("cpu"), role="policy")
    message = str(caught.value)
    assert message.startswith(
        f"policy: cannot load the model {str(directory)!r}: {directory / 'pytorch_model.bin'}"
    )
    assert (
        "holds the object argparse.Namespace, which torch refuses to unpickle" in message
        and "\n" not in message
    )


def test_a_chat_template_the_sandbox_blocks_is_one_line_naming_the_model():
    from mrpo.data.pairs import PreferencePair
    from mrpo.data.tokenization import ModelView
    from tiny_models import char_tokenizer

    escaping = (
        "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    view = ModelView(char_tokenizer(chat_template=escaping), name="gemma")
    user = [{"role": "user", "content": "hi"}]
    pair = PreferencePair(
        "p", user, [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]
    )
    with pytest.raises(
        errors.ModelSourceError, match=r"^gemma \(.*\): its chat template does what the template sandbox"
    ):
        view.tokenize(pair)


def test_a_full_disk_at_a_checkpoint_is_one_training_error_naming_the_step(tmp_path, monkeypatch):
    import errno
    import sys
    from pathlib import Path

    from mrpo.trainer import MRPOTrainer
    from tiny_models import bpe_tokenizer, save_model_dir, tiny_llama

    sys.path.insert(0, str(Path(__file__).parent / "scripts"))
    import trainer_worker as setup

    llama = save_model_dir(tiny_llama(), bpe_tokenizer(), tmp_path / "llama")
    pairs = setup.load_records(setup.standard_records())[:4]
    dataset = setup.build_dataset(pairs, [setup.initialising_reference(llama)], tmp_path / "cache")
    args = setup.training_arguments(tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1)
    trainer = setup.make_trainer(tiny_llama().train(), dataset, args)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoint-1"))

    monkeypatch.setattr(MRPOTrainer, "save_model", full)
    with pytest.raises(errors.TrainingError) as caught:
        trainer.train()
    assert str(caught.value).startswith(
        f"cannot write the checkpoint of step 1 under {tmp_path / 'run'}: no space left on the device"
    )
    assert "--resume" in str(caught.value)


def test_a_write_failure_is_read_from_its_errno_or_its_words_and_any_other_failure_let_through():
    import errno

    def line(error):
        return errors.write_failure(error, "X", no_space="free space", not_writable="write elsewhere")

    assert line(OSError(errno.ENOSPC, "No space left on device", "/c/f")) == (
        "cannot write X: no space left on the device (/c/f); free space"
    )
    # safetensors says it in words only.
    full = Exception('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')
    assert line(full) == "cannot write X: no space left on the device; free space"
    assert line(OSError(errno.EROFS, "Read-only file system")).endswith("not writable; write elsewhere")
    assert line(OSError(errno.ENOENT, "No such file or directory")) is None
    assert line(RuntimeError("something else")) is None
