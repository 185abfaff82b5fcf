"""`mrpo inspect` end to end on tiny models of two families: the one-line error when the cache is missing, the
files it writes, and the forecast clip rate equal to what training then logs over its first epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mrpo.cli import main
from test_train_cli import write_config


def inspect_config(paths: dict[str, Path], name: str, **loss) -> Path:
    """The CLI tests' two-family run, one epoch of two batches of two pairs."""
    training = {"max_steps": -1, "num_train_epochs": 1, "save_strategy": "no"}
    return write_config(paths, name, loss={"beta": 0.1, **loss}, training=training)


def test_a_missing_cache_is_one_line_naming_the_reference_and_the_command(run_setup, capsys):
    config = inspect_config(run_setup, "no-cache")
    assert main(["inspect", str(config)]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("mrpo ")]
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("mrpo inspect: error: reference 1 ('init'")
    assert f"run `mrpo precompute {config}` first" in lines[0]


def test_inspect_writes_the_audit_and_the_suspects(run_setup, capsys):
    config = inspect_config(run_setup, "audited")
    assert main(["precompute", str(config)]) == 0
    capsys.readouterr()
    output = run_setup["root"] / "audit-out"
    assert main(["inspect", str(config), "--output", str(output), "--suspect-threshold", "0"]) == 0
    printed = capsys.readouterr().out
    assert "[train] 4 pairs" in printed and "[eval] 4 pairs" in printed and "verdict:" in printed
    audit = json.loads((output / "inspect.json").read_text())
    assert audit["references"] == ["init", "gemma"]
    train = audit["splits"][0]
    assert train["split"] == "train" and train["pairs"] == 4
    assert [r["name"] for r in train["references"]] == ["init", "gemma"]
    assert set(train["references"][1]["clip_alternatives"]) >= {
        "configured",
        "align=pair",
        "clip=off",
        "eps=1",
    }
    # Each external reference against the start, and every reference against the answers' length.
    versus = train["references"][1]["versus_start"]
    assert set(versus) == {"knows_more", "less_confident", "agreement_difference"}
    assert (
        "Newcombe" in versus["agreement_difference"]["method"]
        and train["references"][0]["versus_start"] is None
    )
    # Over the pairs whose answers differ in length: "4" and "5" do not.
    assert all(ref["length"]["shorter_wins"]["total"] == 3 for ref in train["references"])
    assert "against the start (reference 1)" in printed and "margin against the length difference" in printed
    # Threshold 0: every pair that all references of a group find at least as likely rejected as chosen.
    suspects = [json.loads(line) for line in (output / "suspect_pairs.jsonl").read_text().splitlines()]
    assert len(suspects) == sum(split["suspects"]["count"] for split in audit["splits"])
    for row in suspects:
        assert {"pair_id", "prompt", "chosen", "rejected", "margins", "flagged_by", "rank"} <= set(row)
        assert set(row["margins"]) == {"init", "gemma"}


def test_forecast_clip_rate_is_what_the_first_epoch_logs(run_setup, capsys):
    from mrpo.audit import audit_split
    from mrpo.config.schema import LossConfig, load_config
    from mrpo.prepared_split import prepare_split

    base = load_config(inspect_config(run_setup, "forecast"))
    columns = prepare_split(base, "train", show_progress=False).dataset
    # An eps at which the clamp moves some log-probs but not all, so the comparison is not 0 == 0 or 1 == 1.
    for eps in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0):
        loss = LossConfig(beta=0.1, eps=eps)
        forecast = audit_split(
            "train", ["init", "gemma"], [p.pair_id for p in columns.pairs],
            columns.reference_chosen_logps, columns.reference_rejected_logps,
            columns.reference_chosen_logps.new_ones(2, 4), columns.reference_chosen_logps.new_ones(2, 4), loss,
        ).clip_rate  # fmt: skip
        if 0 < forecast < 1:
            break
    else:
        pytest.fail("no eps gives a partial clip rate on these pairs")
    config = inspect_config(run_setup, "forecast", eps=eps)
    assert main(["train", str(config)]) == 0
    logged = [
        json.loads(line)
        for line in (run_setup["root"] / "forecast" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [row["ctro/clip_rate"] for row in logged if "loss" in row]
    assert (
        len(steps) == 2
    )  # one epoch of two batches of two pairs: the mean of the step means is the epoch mean
    assert sum(steps) / len(steps) == pytest.approx(forecast, abs=1e-6)
    capsys.readouterr()
    assert main(["inspect", str(config), "--output", str(run_setup["root"] / "forecast-audit")]) == 0
    assert f"forecast ctro/clip_rate {forecast:.1%}" in capsys.readouterr().out


@pytest.mark.parametrize("cache_tokenized", [True, False])
def test_inspect_measures_length_in_characters_of_the_texts(run_setup, capsys, cache_tokenized):
    """The length comparison uses the completion texts' characters (message contents here), aligned by pair id
    with the cached margins: read again from the data when the tokens came from the disk cache, or from memory."""
    from mrpo.audit_stats import correlation
    from mrpo.config.schema import load_config
    from mrpo.data.sources import load_pairs
    from mrpo.prepared_split import prepare_split

    config = inspect_config(run_setup, "lengths")
    override = f"data.cache_tokenized={str(cache_tokenized).lower()}"
    assert main(["precompute", str(config), override]) == 0
    output = run_setup["root"] / f"lengths-audit-{cache_tokenized}"
    assert main(["inspect", str(config), "--output", str(output), override]) == 0
    capsys.readouterr()
    audit = json.loads((output / "inspect.json").read_text())["splits"][0]
    dataset = prepare_split(load_config(config), "train", show_progress=False).dataset
    texts = {pair.pair_id: pair for pair in load_pairs(str(run_setup["train"]))}
    characters = [
        len(texts[p.pair_id].rejected[0]["content"]) - len(texts[p.pair_id].chosen[0]["content"])
        for p in dataset.pairs
    ]
    assert sorted(characters) == [0, 8, 9, 9]  # "5" vs "4", "Paris, I think." vs "Madrid.", ...
    margins = dataset.reference_chosen_logps - dataset.reference_rejected_logps
    for k, ref in enumerate(audit["references"]):
        assert ref["length"]["correlation"] == pytest.approx(
            correlation(margins[k], torch.tensor(characters)), abs=1e-6
        )


def test_inspect_with_one_reference_says_plain_dpo(run_setup, capsys):
    training = {"max_steps": -1, "num_train_epochs": 1, "save_strategy": "no"}
    references = [{"name": "init", "model": str(run_setup["llama"]), "dtype": "float32"}]
    config = write_config(run_setup, "k1", references=references, training=training)
    assert main(["precompute", str(config)]) == 0
    capsys.readouterr()
    output = run_setup["root"] / "k1-audit"
    assert main(["inspect", str(config), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "[train] 4 pairs; K = 1: plain DPO, nothing to compare" in printed
    table = printed.split("verdict:")[0]
    assert "alpha" not in table and "CTRO" not in table and "clip" not in table
    train = json.loads((output / "inspect.json").read_text())["splits"][0]
    assert train["references"][0]["alpha_mean"] is None and train["clip_rate"] is None
    assert train["verdict"][0].startswith("K = 1: plain DPO, nothing to compare")
