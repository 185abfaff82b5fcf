"""`mrpo inspect` end to end on tiny models of two families: the one-line error when the cache is missing, the
files it writes, and the forecast clip rate equal to what training then logs over its first epoch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from mrpo.cli import main
from tiny_models import bpe_tokenizer, char_tokenizer, save_model_dir, tiny_gemma3, tiny_llama

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trainer_worker as setup  # noqa: E402


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect")
    train = root / "pairs.jsonl"
    train.write_text(
        "".join(json.dumps(row) + "\n" for row in setup.conversational_records()), encoding="utf-8"
    )
    return {
        "root": root,
        "train": train,
        "llama": save_model_dir(tiny_llama(), bpe_tokenizer(), root / "llama"),
        "gemma": save_model_dir(tiny_gemma3(), char_tokenizer(), root / "gemma"),
    }


def write_config(paths: dict[str, Path], name: str, **loss) -> Path:
    config = {
        "policy": {"model": str(paths["llama"]), "dtype": "float32"},
        "references": [
            {"name": "init", "model": str(paths["llama"]), "dtype": "float32"},
            {"name": "gemma", "model": str(paths["gemma"]), "dtype": "float32"},
        ],
        "data": {"train": str(paths["train"]), "eval": str(paths["train"])},
        "loss": {"beta": 0.1, **loss},
        "training": {
            "output_dir": str(paths["root"] / name),
            "per_device_train_batch_size": 2,
            "num_train_epochs": 1,
            "logging_steps": 1,
            "save_strategy": "no",
            "learning_rate": 0.1,
            "optim": "sgd",
            "use_cpu": True,
            "disable_tqdm": True,
        },
        "cache_dir": str(paths["root"] / "cache"),
    }
    path = paths["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_a_missing_cache_is_one_line_naming_the_reference_and_the_command(paths, capsys):
    config = write_config(paths, "no-cache")
    assert main(["inspect", str(config)]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("mrpo ")]
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("mrpo inspect: error: reference 1 ('init'")
    assert f"run `mrpo precompute {config}` first" in lines[0]


def test_inspect_writes_the_audit_and_the_suspects(paths, capsys):
    config = write_config(paths, "audited")
    assert main(["precompute", str(config)]) == 0
    capsys.readouterr()
    output = paths["root"] / "audit-out"
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
    # Threshold 0: every pair that all references of a group find at least as likely rejected as chosen.
    suspects = [json.loads(line) for line in (output / "suspect_pairs.jsonl").read_text().splitlines()]
    assert len(suspects) == sum(split["suspects"]["count"] for split in audit["splits"])
    for row in suspects:
        assert {"pair_id", "prompt", "chosen", "rejected", "margins", "flagged_by", "rank"} <= set(row)
        assert set(row["margins"]) == {"init", "gemma"}


def test_forecast_clip_rate_is_what_the_first_epoch_logs(paths, capsys):
    from mrpo.audit import audit_split
    from mrpo.config import LossConfig, load_config
    from mrpo.pipeline import prepare_split

    base = load_config(write_config(paths, "forecast"))
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
    config = write_config(paths, "forecast", eps=eps)
    assert main(["train", str(config)]) == 0
    logged = [
        json.loads(line) for line in (paths["root"] / "forecast" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [row["ctro/clip_rate"] for row in logged if "loss" in row]
    assert (
        len(steps) == 2
    )  # one epoch of two batches of two pairs: the mean of the step means is the epoch mean
    assert sum(steps) / len(steps) == pytest.approx(forecast, abs=1e-6)
    capsys.readouterr()
    assert main(["inspect", str(config), "--output", str(paths["root"] / "forecast-audit")]) == 0
    assert f"forecast ctro/clip_rate {forecast:.1%}" in capsys.readouterr().out
