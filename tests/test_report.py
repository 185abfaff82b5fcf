"""`mrpo report`: plots and report.md from run directories written by the test (no training needed)."""

import json
import sys

import pytest
import yaml

from mrpo.audit_forecast import PARTIAL_CLIP_RATE, SATURATED_CLIP_RATE, clip_severity
from mrpo.cli import main
from mrpo.errors import ReportError
from mrpo.report import write_report
from mrpo.report_tables import held_out_models
from mrpo.rundir import load_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVE_PLOTS = ["loss.png", "rewards.png", "alpha.png", "ctro.png"]


def _metrics_lines(clip_rate: float, accuracy_offset: float = 0.0) -> list[dict]:
    """Three train lines, two eval lines and the end-of-training line, shaped like JsonlMetricsCallback's."""
    lines = []
    for step in (1, 2, 3):
        lines.append(
            {
                "step": step,
                "epoch": step / 3,
                "loss": 0.70 - 0.05 * step,
                "rewards/accuracies": 0.5 + 0.1 * step + accuracy_offset,
                "rewards/margins": 0.02 * step,
                "alpha/ref1": 0.6,
                "alpha/ref2": 0.4,
                "ctro/eps_chosen": 0.01 * step,
                "ctro/eps_rejected": 0.02 * step,
                "ctro/clip_rate": clip_rate,
                "learning_rate": 1e-5,
            }
        )
        if step in (2, 3):
            lines.append(
                {
                    "step": step,
                    "epoch": step / 3,
                    "eval_loss": 0.69 - 0.01 * step,
                    "eval_rewards/accuracies": 0.55 + 0.05 * step,
                    "eval_rewards/margins": 0.01 * step,
                    "eval_alpha/ref1": 0.55,
                    "eval_alpha/ref2": 0.45,
                    "eval_ctro/clip_rate": clip_rate,
                }
            )
    lines.append({"step": 3, "epoch": 1.0, "train_runtime": 12.5, "train_loss": 0.6})
    return lines


def _model_result(label: str, policy_accuracy: float, label_aware: bool) -> dict:
    return {
        "label": label,
        "model": f"models/{label}",
        "pairs": 40,
        "metrics": {
            "policy_accuracy": policy_accuracy,
            "policy_accuracy_per_token": 0.6,
            "reward_accuracy_initialising": 0.55,
            "reward_accuracy_virtual": 0.7,
            "policy_margin": 0.25,
            "reward_margin_initialising": 0.03,
            "reward_margin_virtual": 0.05,
            "clip_rate": 0.8,
        },
        "label_aware": label_aware,
        "by_kind": {"arithmetic": {"policy_accuracy": 0.5, "pairs": 20}},
    }


def write_fake_run(
    directory,
    *,
    name="mrpo",
    clip_rate=0.9,
    accuracy_offset=0.0,
    trained_accuracy=0.675,
    references=2,
    evaluated=True,
    pairs_used=123,
    tokenization_drops=None,
):
    directory.mkdir(parents=True)
    metrics = _metrics_lines(clip_rate, accuracy_offset)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in metrics))
    known = [{"name": "init", "model": "models/start"}, {"name": "gemma", "model": "models/gemma"},
             {"name": "qwen", "model": "models/qwen"}]  # fmt: skip
    config = {
        "policy": {"model": "models/start"},
        "references": known[:references],
        "data": {"train": "pairs.jsonl"},
        "loss": {"beta": 0.1, "clip": "adaptive", "eps": 0.1},
        "lora": {"enabled": True},
    }
    (directory / "mrpo_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (directory / "data_summary.json").write_text(
        json.dumps(
            {
                "train": {
                    "source": "pairs.jsonl",
                    "rows_read": 130,
                    "pairs_loaded": 128,
                    "pairs_used": pairs_used,
                    "dropped_on_load": {"identical": 2},
                    "dropped_by_tokenization": tokenization_drops or {"too_long": 5},
                }
            }
        )
    )
    label_aware = references > 1
    results = {
        "split": {"source": "eval.jsonl", "split": "test"},
        "references": [reference["name"] for reference in config["references"]],
        "loss": config["loss"],
        "models": [
            _model_result("start", 0.5, label_aware),
            _model_result(name, trained_accuracy, label_aware),
        ],
    }
    if evaluated:
        (directory / "eval_results.json").write_text(json.dumps(results))
    return directory


def assert_valid_png(path):
    from matplotlib.image import imread

    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].var() > 1e-3, f"{path.name} is blank"


def test_one_run_writes_plots_and_summary(tmp_path):
    run = write_fake_run(tmp_path / "mrpo")
    report = write_report([run])

    assert report == run / "report.md"
    for name in [*CURVE_PLOTS, "heldout.png"]:
        assert_valid_png(run / name)
    text = report.read_text()
    # The clip rate comes before everything else, and a rate above the threshold is called out.
    assert text.index("clip rate") < text.index("## Training curves") < text.index("## Held-out metrics")
    assert "**90.0%** | clipped away ≈ DPO |" in text
    assert "⚠️ **mrpo: CTRO clipped 90% of the external references' log-probs" in text
    # Final and best train/eval numbers, with the step of the best.
    assert "| loss | 0.55 | 0.55 (step 3) | 0.66 | 0.66 (step 3) |" in text
    assert "| reward accuracy | 80.0% | 80.0% (step 3) | 70.0% | 70.0% (step 3) |" in text
    assert "| alpha ref2 (gemma) | 0.4 | — | 0.45 | — |" in text
    assert "Finished: 3 steps, 12 s, mean train loss 0.6.  \n" in text
    # The held-out table (markdown, label-aware marked) and the data summary.
    assert "| metric | start | mrpo |" in text
    assert "| policy pref. acc. (pw > pl) | 50.0% | 67.5% |" in text
    assert "| reward acc. vs virtual ref | 70.0%* | 70.0%* |" in text and "label-aware" in text
    assert "| arithmetic | 50.0% | 50.0% |" in text
    assert "| train | `pairs.jsonl` | 130 | 128 | **123** | 2 (identical: 2) | 5 (too_long: 5) |" in text
    # The resolved config, collapsed, and the images linked.
    assert "<details><summary>Resolved config (mrpo_config.yaml)</summary>" in text
    assert "name: gemma" in text and "References (K = 2): `init`" in text
    for name in [*CURVE_PLOTS, "heldout.png"]:
        assert f"]({name})" in text


def test_two_runs_share_plots_and_the_start_model_once(tmp_path):
    dpo = write_fake_run(
        tmp_path / "dpo", name="dpo", clip_rate=0.0, accuracy_offset=-0.1, trained_accuracy=0.6
    )
    mrpo = write_fake_run(tmp_path / "mrpo", clip_rate=0.2)
    output = tmp_path / "comparison"
    report = write_report([dpo, mrpo], output)

    for name in [*CURVE_PLOTS, "heldout.png"]:
        assert_valid_png(output / name)
    assert not (dpo / "report.md").exists()
    runs = [load_run(dpo), load_run(mrpo)]
    # Both runs evaluated the same "start" model with identical results: one column for it.
    assert [model.name for model in held_out_models(runs)] == ["start", "dpo", "mrpo"]
    text = report.read_text()
    assert "| metric | start | dpo | mrpo |" in text
    assert "### dpo" in text and "### mrpo" in text
    assert "CTRO clipped" not in text  # both mean clip rates are in the lowest band: no warning
    assert "**20.0%** | enters the loss |" in text


def test_comparison_plots_draw_one_line_per_run(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved = {}
    original_savefig = Figure.savefig

    def recording_savefig(figure, path, **kwargs):
        saved[path.name] = figure
        return original_savefig(figure, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    runs = [write_fake_run(tmp_path / "dpo", name="dpo"), write_fake_run(tmp_path / "mrpo")]
    write_report(runs, tmp_path / "out")

    def labels(name, panel=0):
        return [line.get_label() for line in saved[name].axes[panel].get_lines()]

    assert labels("loss.png") == ["dpo: train", "dpo: eval", "mrpo: train", "mrpo: eval"]
    assert labels("ctro.png", 0) == [
        "dpo: eps chosen",
        "dpo: eps rejected",
        "mrpo: eps chosen",
        "mrpo: eps rejected",
    ]
    assert labels("alpha.png", 1) == ["dpo: train", "dpo: eval", "mrpo: train", "mrpo: eval"]
    assert saved["alpha.png"].axes[1].get_title() == "reference 2 (gemma)"
    steps, values = saved["loss.png"].axes[0].get_lines()[0].get_data()
    assert list(steps) == [1, 2, 3] and values[-1] == pytest.approx(0.55)
    bars = [patch for patch in saved["heldout.png"].axes[0].patches]
    assert len(bars) == 3 * 5 and any(bar.get_hatch() == "//" for bar in bars)  # start, dpo, mrpo x 5 rates


def test_start_results_that_differ_stay_apart(tmp_path):
    first = write_fake_run(tmp_path / "a" / "run")
    second = write_fake_run(tmp_path / "b" / "run", trained_accuracy=0.7)
    results = json.loads((second / "eval_results.json").read_text())
    results["models"][0]["metrics"]["policy_accuracy"] = 0.45  # another eval split: another "start" result
    (second / "eval_results.json").write_text(json.dumps(results))
    runs = [load_run(first), load_run(second)]
    from mrpo.report import _unique_names

    _unique_names(runs)
    assert [run.name for run in runs] == ["a/run", "b/run"]
    names = [model.name for model in held_out_models(runs)]
    assert names == ["a/run/start", "a/run/mrpo", "b/run/start", "b/run/mrpo"]


def test_missing_metrics_is_a_clear_error(tmp_path):
    run = write_fake_run(tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    with pytest.raises(
        ReportError, match=r"run directory .*run' has no metrics.jsonl.*eval_results.json.*optional"
    ):
        write_report([run])
    with pytest.raises(ReportError, match="does not exist"):
        write_report([tmp_path / "nowhere"])


def test_optional_files_may_be_missing_and_a_torn_last_line_is_skipped(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    lines = [json.dumps(line) for line in _metrics_lines(0.3)[:3]]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "lo')  # killed mid-write
    with pytest.warns(UserWarning, match="unfinished last line"):
        report = write_report([run], tmp_path / "out")
    text = report.read_text()
    assert "- `bare`: no held-out results (no eval_results.json in" in text and "no data_summary.json" in text
    assert "run `mrpo evaluate CONFIG --checkpoint bare=" in text
    assert "skipped the unfinished last line 4" in text and "Not finished" in text
    assert not (tmp_path / "out" / "heldout.png").exists()
    assert_valid_png(tmp_path / "out" / "loss.png")

    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\nnot json\n{"step": 2, "loss": 0.6}\n')
    with pytest.raises(ReportError, match="line 2: not a JSON object"):
        write_report([run], tmp_path / "out")


def test_without_matplotlib_the_summary_is_still_written(tmp_path, monkeypatch):
    run = write_fake_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = write_report([run], tmp_path / "out")
    assert "matplotlib is not installed" in report.read_text()
    assert not list((tmp_path / "out").glob("*.png"))


def test_cli_report(tmp_path, capsys):
    first = write_fake_run(tmp_path / "dpo", name="dpo", clip_rate=0.0)
    second = write_fake_run(tmp_path / "mrpo")
    assert main(["report", str(first), str(second), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'out' / 'report.md'}" in out and "loss.png" in out
    assert (tmp_path / "out" / "report.md").exists()

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "mrpo report: error: run directory" in capsys.readouterr().err


def test_report_shows_the_audit_and_marks_live_warnings_on_the_curves(tmp_path, monkeypatch):
    import torch

    from mrpo.audit import audit_split
    from mrpo.config.schema import DiagnosticsConfig, LossConfig
    from mrpo.diagnostics import TrainingWatcher

    run_dir = tmp_path / "mrpo"
    write_fake_run(run_dir, clip_rate=0.99)
    chosen = torch.tensor([[-10.0, -12.0, -9.0], [-20.0, -25.0, -19.0]])
    rejected = torch.tensor([[-11.0, -15.0, -9.5], [-22.0, -24.0, -21.0]])
    audit = audit_split(
        "train",
        ["init", "gemma"],
        ["a", "b", "c"],
        chosen,
        rejected,
        torch.ones(2, 3),
        torch.ones(2, 3),
        LossConfig(),
    )
    (run_dir / "inspect.json").write_text(
        json.dumps({"references": ["init", "gemma"], "splits": [audit.to_json()]})
    )
    watcher = TrainingWatcher(DiagnosticsConfig(window=2), ["init", "gemma"])
    fired = [
        d
        for step, row in enumerate(_metrics_lines(0.99), start=1)
        if "loss" in row
        for d in watcher.observe(row["step"], row)
    ]
    assert [d.condition for d in fired] == ["clip_saturation"]
    (run_dir / "diagnostics.jsonl").write_text("".join(json.dumps(d.__dict__) + "\n" for d in fired))

    drawn = []
    from matplotlib.axes import Axes

    original = Axes.axvline
    monkeypatch.setattr(
        Axes, "axvline", lambda self, x, *a, **k: drawn.append(x) or original(self, x, *a, **k)
    )
    text = write_report([run_dir]).read_text()
    assert "## Reference audit (`mrpo inspect`, before training)" in text
    assert audit.verdict[0] in text
    assert "## Live diagnostics" in text and "| mrpo | 2 | clip_saturation |" in text
    assert drawn and set(drawn) == {2}  # the warning's step, on every panel that was drawn


def test_clip_rate_has_one_scale_of_severity(tmp_path):
    assert (PARTIAL_CLIP_RATE, SATURATED_CLIP_RATE) == (0.25, 0.9)
    assert clip_severity(0.0) == clip_severity(0.2499) == "enters the loss"
    assert clip_severity(0.25) == clip_severity(0.67) == "enters the loss only partly"
    away = "clipped away ≈ DPO"
    assert clip_severity(0.9) == clip_severity(1.0) == away
    text = write_report([write_fake_run(tmp_path / "mrpo", clip_rate=0.67)]).read_text()
    assert "**67.0%** | enters the loss only partly |" in text
    assert (
        "**mrpo: CTRO clipped 67% of the external references' log-probs on average (train) — enters the loss only "
        "partly.**" in text
    )
    assert "⚠️ **mrpo" not in text and "DPO in disguise" not in text


def test_a_k1_run_shows_no_ctro_or_alpha_figures(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved = {}
    original_savefig = Figure.savefig

    def recording_savefig(figure, path, **kwargs):
        saved[path.name] = figure
        return original_savefig(figure, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    # A run from before K = 1 stopped logging them: its metrics.jsonl still holds alpha/ref1 and ctro/*.
    dpo = write_fake_run(tmp_path / "dpo", name="dpo", clip_rate=0.0, references=1)
    mrpo = write_fake_run(tmp_path / "mrpo", clip_rate=0.5)
    text = write_report([dpo, mrpo], tmp_path / "out").read_text()
    clip_section = text[: text.index("## Live diagnostics")]
    assert "- `dpo`: K = 1: DPO (one reference: no CTRO, no alpha)." in clip_section
    assert "| dpo |" not in clip_section and "| mrpo | 2 | adaptive | **50.0%** |" in clip_section
    dpo_section = text[text.index("### dpo") : text.index("### mrpo")]
    for figure in ("CTRO clip rate", "alpha ref", "eps chosen"):
        assert figure not in dpo_section
    assert "| metric | dpo/start | dpo | mrpo/start | mrpo |" in text
    assert "| CTRO clip rate | — (K = 1) | — (K = 1) | 80.0% | 80.0% |" in text
    drawn = [
        line.get_label()
        for name in ("ctro.png", "alpha.png")
        for ax in saved[name].axes
        for line in ax.get_lines()
    ]
    assert drawn and not any(label.startswith("dpo") for label in drawn)


def test_a_run_without_eval_results_says_what_to_run_and_shows_its_training_evaluation(tmp_path):
    run = write_fake_run(tmp_path / "mrpo", evaluated=False)
    text = write_report([run]).read_text()
    held_out = text[text.index("## Held-out metrics") : text.index("## Runs")]
    command = (
        f"`mrpo evaluate {run / 'mrpo_config.yaml'} --checkpoint mrpo={run / 'final'} "
        f"--output {run / 'eval_results.json'}`"
    )
    assert (
        f"- `mrpo`: no held-out results (no eval_results.json in `{run}`): run {command} (no final/ yet"
        in held_out
    )
    # The training's own evaluation (metrics.jsonl's last eval line) is shown meanwhile, label-aware marked.
    assert "| step | 3 |" in held_out and "| eval loss | 0.66 |" in held_out
    assert "| reward accuracy | 70.0%* |" in held_out and "| CTRO clip rate | 90.0% |" in held_out
    assert "label-aware" in held_out


def test_held_out_table_shows_intervals_the_paired_difference_and_different_pair_counts(tmp_path):
    dpo = write_fake_run(tmp_path / "dpo", name="dpo", clip_rate=0.0, trained_accuracy=0.6, pairs_used=178)
    drops = {"too_long": 5, "longer than 64 tokens for qwen": 2}
    mrpo = write_fake_run(tmp_path / "mrpo", pairs_used=176, tokenization_drops=drops)
    results = json.loads((mrpo / "eval_results.json").read_text())
    results["models"][1]["intervals"] = {"policy_accuracy": [0.52, 0.80]}
    results["models"][1]["paired"] = {"baseline": "dpo", "metric": "policy_accuracy", "pairs": 40, "difference": 0.075,
                                      "low": -0.01, "high": 0.16, "better": 5, "worse": 2, "method": "m"}  # fmt: skip
    results["models"][1]["pairs"] = 38
    (mrpo / "eval_results.json").write_text(json.dumps(results))
    text = write_report([dpo, mrpo], tmp_path / "out").read_text()
    assert (
        "> ⚠️ **Not the same train pairs:** mrpo trained on 176 pairs, dpo on 178: mrpo has 2 fewer (longer than "
        "64 tokens for qwen: 2)." in text
    )
    assert "| policy pref. acc. (pw > pl) | 50.0% | 60.0% | 67.5% [52.0, 80.0] |" in text
    assert "| Δ policy pref. acc. vs baseline (pts) | — | — | +7.5 [-1.0, +16.0] |" in text
    assert "Δ mrpo − dpo: +7.5 [-1.0, +16.0] points over 40 shared pairs" in text
    assert "no evidence of a difference" in text
    assert "Not the same held-out pairs: mrpo evaluated on 38 pairs, start on 40, dpo on 40" in text


def test_model_card_says_steps_names_the_held_out_metrics_and_a_hub_base_model(tmp_path):
    from mrpo.rundir import write_model_card

    run = write_fake_run(tmp_path / "run")
    saved = yaml.safe_load((run / "mrpo_config.yaml").read_text())
    saved["training"] = {"learning_rate": 5e-4, "max_steps": 3, "num_train_epochs": 3.0}  # effective values
    (run / "mrpo_config.yaml").write_text(yaml.safe_dump(saved))
    start = tmp_path / "start"
    start.mkdir()
    (start / "config.json").write_text(json.dumps({"_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    config = {**saved, "policy": {"model": str(start)}, "training": {"max_steps": 3}}
    card = write_model_card(run, config, None).read_text()
    assert "3 steps" in card and "None epochs" not in card and "3.0 epochs" not in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in card
    assert f"Policy: `{start}` (`HuggingFaceTB/SmolLM2-135M-Instruct` on the Hub)" in card
    assert "| reward accuracy (vs the virtual reference) | 70.0% |" in card  # the last eval line, step 3
    assert "| mean weight alpha of `gemma` | 0.45 |" in card and "| loss | 0.66 |" in card
    assert "eval_rewards/accuracies" not in card and "Held-out pairs at the end of training (step 3)" in card


def test_model_card_of_a_local_model_leaves_base_model_out_and_counts_epochs(tmp_path):
    from mrpo.rundir import hub_id_of, write_model_card

    run = write_fake_run(tmp_path / "run")
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(local)}))  # a path, not a Hub id
    card = write_model_card(run, {**yaml.safe_load((run / "mrpo_config.yaml").read_text()),
                                  "policy": {"model": str(local)}, "training": {"num_train_epochs": 2.0}}, None).read_text()  # fmt: skip
    assert "base_model" not in card and f"Policy: `{local}`, LoRA" in card and "2.0 epochs" in card
    cached = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    assert hub_id_of(str(cached)) == "org/name" and hub_id_of("org/name") == "org/name"


def test_the_starts_reward_accuracy_against_itself_is_not_a_number(tmp_path):
    from types import SimpleNamespace

    import torch

    from mrpo.config.schema import LossConfig
    from mrpo.evaluation import format_table, split_metrics

    generator = torch.Generator().manual_seed(0)
    reference = -torch.rand(2, 1, 50, generator=generator, dtype=torch.float64) * 30 - 5
    noise = torch.randn(50, 2, generator=generator, dtype=torch.float64) * 1e-6  # batching's float noise
    logps = torch.stack([reference[0, 0], reference[1, 0]], dim=1) + noise

    class Dataset(SimpleNamespace):
        def __len__(self):
            return 50

    dataset = Dataset(
        reference_chosen_logps=reference[0], reference_rejected_logps=reference[1], num_references=1
    )
    prepared = SimpleNamespace(
        dataset=dataset, text_pairs=lambda: [], tokenization=SimpleNamespace(pair_ids=[])
    )
    tokens = torch.full((50, 2), 10)
    noisy = split_metrics("start", "m", prepared, LossConfig(), logps, tokens)
    assert 0.2 < noisy.metrics["reward_accuracy_initialising"] < 0.8  # what it printed: noise, e.g. 26.0%
    start = split_metrics("start", "m", prepared, LossConfig(), logps, tokens, initialising=True)
    assert (
        start.metrics["reward_accuracy_initialising"] != start.metrics["reward_accuracy_initialising"]
    )  # NaN
    assert abs(start.metrics["reward_margin_initialising"]) < 1e-5
    row = next(line for line in format_table([start]).splitlines() if line.startswith("reward acc. vs init"))
    assert row.split()[-1] == "—"


def test_the_held_out_subsample_is_counted_under_max_eval_pairs(tmp_path):
    from mrpo.config.schema import load_config
    from mrpo.splits import read_split

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(6)]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config(None, ["policy.model=m", f"data.train={pairs}", f"data.eval={pairs}", "data.max_eval_pairs=2",
                                "data.max_pairs=4"])  # fmt: skip
    assert "not in subsample (max_eval_pairs=2, seed=0): 4" in read_split(config, "eval").summary()
    assert "not in subsample (max_pairs=4, seed=0): 2" in read_split(config, "train").summary()
