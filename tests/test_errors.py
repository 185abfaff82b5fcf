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
    from mrpo import collator, config, data, lm_eval_bridge, models, references, report, trainer

    assert config.ConfigError is errors.ConfigError and data.DataError is errors.DataError
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
