"""The lm-eval bridge: shipped offline tasks on a tiny model dir and a LoRA adapter on it; TruthfulQA MC1 from a
made-up fixture file, its accuracy checked against the model's own log-likelihoods; clear errors."""

import json
import sys
from pathlib import Path

import pytest
import torch

from mrpo.config.schema import DataConfig, MRPOConfig, PolicyConfig
from mrpo.lm_eval_tasks import SOURCED_TASKS, TASK_DIR
from mrpo.lm_eval_tasks.task_data import SHIPPED_TASKS, arithmetic_rows, facts_rows
from mrpo.lm_eval_tasks.truthfulqa import TRUTHFULQA_TASK, read_truthfulqa
from tiny_models import bpe_tokenizer, save_model_dir, tiny_llama

pytest.importorskip("lm_eval")

import mrpo.models  # noqa: E402
from mrpo.errors import LMEvalError, LMEvalNotInstalledError
from mrpo.lm_eval_bridge import LMEvalResult, prepare_task_dir, resolve_lm_eval_tasks, run_lm_eval

TASKS = ["mrpo_arithmetic", "mrpo_facts"]
TRUTHFULQA_FIXTURE = Path(__file__).parent / "data" / "truthfulqa_mc_fixture.json"
"""Five made-up questions in BIG-bench's truthful_qa task_mc.json format."""


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny full model directory and a LoRA adapter directory (non-zero adapters) on top of it."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lm_eval_models")
    base = save_model_dir(tiny_llama(), bpe_tokenizer(), root / "base")
    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    peft_model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def _config(model_dir, cache_dir) -> MRPOConfig:
    return MRPOConfig(
        policy=PolicyConfig(model=str(model_dir)),
        data=DataConfig(train="unused.jsonl"),
        cache_dir=str(cache_dir),
    )


def test_task_data_is_deterministic_and_well_formed():
    assert arithmetic_rows() == arithmetic_rows() and facts_rows() == facts_rows()
    for row in arithmetic_rows()["test"]:
        a, op, b = row["question"].removeprefix("What is ").removesuffix("?").split()
        assert str(eval(f"{a} {op} {b}")) == row["answer"] and int(row["answer"]) >= 0
    for row in facts_rows()["test"]:
        assert len(set(row["choices"])) == 4 and 0 <= row["answer"] < 4
    assert sorted(path.stem for path in TASK_DIR.glob("*.yaml")) == sorted([*SHIPPED_TASKS, *SOURCED_TASKS])


def test_prepared_task_dir_points_lm_eval_at_absolute_data_files(tmp_path):
    import yaml

    directory = prepare_task_dir(tmp_path / "cache")
    assert prepare_task_dir(tmp_path / "cache") == directory  # content-keyed: written once
    for task in TASKS:
        config = yaml.safe_load((directory / f"{task}.yaml").read_text())
        for path in config["dataset_kwargs"]["data_files"].values():
            assert path.startswith(str(directory)) and json.loads(open(path).readline())


def test_shipped_tasks_on_a_model_dir_and_a_lora_adapter(model_dirs, tmp_path, monkeypatch, caplog):
    base, adapter = model_dirs
    config = _config(base, tmp_path / "cache")
    loaded = []
    original = mrpo.models.load_for_evaluation

    def recording_loader(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(mrpo.models, "load_for_evaluation", recording_loader)

    with caplog.at_level("WARNING", logger="lm_eval"):
        start = run_lm_eval(config, None, TASKS, limit=4)
    assert (
        "is not of type `str`" not in caplog.text and "already-initialized" not in caplog.text
    )  # noise, dropped
    tuned = run_lm_eval(config, str(adapter), TASKS, label="mrpo", limit=4)

    from peft import PeftModel

    assert not isinstance(loaded[0], PeftModel) and isinstance(loaded[1], PeftModel)
    for result in (start, tuned):
        assert set(result.metrics) == set(TASKS)
        values = [
            result.metrics["mrpo_arithmetic"]["exact_match,strip"],
            result.metrics["mrpo_facts"]["acc"],
            result.metrics["mrpo_facts"]["acc_norm"],
        ]
        assert all(0.0 <= value <= 1.0 for value in values)
        assert result.samples == {"mrpo_arithmetic": 4, "mrpo_facts": 4}
        assert "mrpo_facts" in result.table and "acc" in result.table
    assert start.label == "start" and start.model == str(base)
    assert tuned.table.startswith(f"lm-eval: mrpo ({adapter})")


def test_missing_lm_eval_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(LMEvalNotInstalledError, match=r"pip install 'mrpo\[eval\]'") as error:
        run_lm_eval(_config("unused-model", tmp_path), None, TASKS)
    assert isinstance(error.value, ImportError)


@pytest.fixture
def fake_harness(monkeypatch):
    """lm-eval's TaskManager and simple_evaluate replaced: indexing its ~15k built-in tasks takes seconds."""
    import lm_eval
    import lm_eval.tasks

    managers, calls = [], []

    class FakeTaskManager:
        def __init__(self, include_path, include_defaults):
            self.include_path, self.include_defaults = include_path, include_defaults
            self.all_tasks = ["hellaswag", *TASKS] if include_defaults else TASKS
            managers.append(self)

    def fake_simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {"hellaswag": {"alias": "hellaswag", "acc,none": 0.25, "acc_stderr,none": 0.01}}}

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeTaskManager)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    return managers, calls


def test_unknown_task_lists_the_shipped_ones(tmp_path, fake_harness):
    config = _config("unused-model", tmp_path)
    with pytest.raises(
        LMEvalError, match="mrpo ships mrpo_arithmetic and mrpo_facts.*did you mean mrpo_facts"
    ):
        run_lm_eval(config, None, ["mrpo_fact"])  # our namespace is checked before lm-eval indexes its tasks
    assert not fake_harness[0]
    with pytest.raises(LMEvalError, match="'hellaswagg'.*mrpo ships mrpo_arithmetic.*did you mean hellaswag"):
        run_lm_eval(config, None, ["hellaswagg", "mrpo_facts"])
    assert fake_harness[0][-1].include_defaults
    with pytest.raises(LMEvalError, match="no lm-eval task given"):
        run_lm_eval(config, None, [])


def test_builtin_tasks_pass_through_unchanged(tmp_path, model_dirs, fake_harness):
    """A harness task name goes to simple_evaluate as is, with lm-eval's own tasks indexed next to ours."""
    managers, calls = fake_harness
    result = run_lm_eval(_config(model_dirs[0], tmp_path), None, ["hellaswag", "mrpo_facts"])
    assert calls[0]["tasks"] == ["hellaswag", "mrpo_facts"]
    assert managers[0].include_defaults
    assert (tmp_path / "lm_eval_tasks").resolve() in Path(managers[0].include_path).parents
    assert result.metrics == {"hellaswag": {"acc": 0.25}}


def test_the_shipped_tasks_run_with_plain_lm_eval_include_path(tmp_path, capsys):
    from lm_eval.tasks import TaskManager

    from mrpo.cli import main

    assert main(["lm-eval-tasks", str(tmp_path / "tasks")]) == 0
    captured = capsys.readouterr()
    directory = captured.out.strip()
    assert f"--include_path {directory} --tasks mrpo_arithmetic,mrpo_facts" in captured.err
    manager = TaskManager(include_path=directory, include_defaults=False)
    assert {"mrpo_arithmetic", "mrpo_facts"} <= set(manager.all_tasks)


def _choice_loglikelihoods(model, tokenizer, prompt: str, choices: list[str]) -> list[float]:
    """log P(" choice" | prompt) of each choice: the log-probabilities of the tokens that " choice" adds to the
    prompt's tokens, summed."""
    context = tokenizer.encode(prompt)
    values = []
    for choice in choices:
        whole = tokenizer.encode(f"{prompt} {choice}")
        assert whole[: len(context)] == context
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].float()
        logprobs = torch.log_softmax(logits[len(context) - 1 : -1], dim=-1)  # position t predicts token t + 1
        values.append(logprobs.gather(1, torch.tensor(whole[len(context) :])[:, None]).sum().item())
    return values


def _argmax(values) -> int:
    return max(range(len(values)), key=lambda index: (values[index], -index))  # the first of ties, as lm-eval


def test_truthfulqa_accuracy_is_that_of_the_model_loglikelihoods(model_dirs, tmp_path, monkeypatch):
    base, _ = model_dirs
    config = _config(base, tmp_path / "cache")
    loaded = []
    original = mrpo.models.load_for_evaluation
    monkeypatch.setattr(
        mrpo.models, "load_for_evaluation", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1]
    )
    result = run_lm_eval(
        config, None, [], truthfulqa=TRUTHFULQA_FIXTURE, per_document=True
    )  # the file adds it
    assert result.tasks == [TRUTHFULQA_TASK] and result.samples == {TRUTHFULQA_TASK: 5}

    hits, norm_hits, first_hits = [], [], []
    for row in read_truthfulqa(TRUTHFULQA_FIXTURE):
        lls = _choice_loglikelihoods(loaded[0], bpe_tokenizer(), row["prompt"], row["choices"])
        hits.append(_argmax(lls) == row["answer"])
        norm_hits.append(
            _argmax([ll / len(c) for ll, c in zip(lls, row["choices"], strict=True)]) == row["answer"]
        )
        first_hits.append(_argmax(lls) == 0)
    acc, acc_norm = sum(hits) / len(hits), sum(norm_hits) / len(norm_hits)
    assert result.metrics[TRUTHFULQA_TASK] == pytest.approx({"acc": acc, "acc_norm": acc_norm})
    # Per document, in the file's order: what a paired comparison of two models reads.
    assert result.documents[TRUTHFULQA_TASK] == [
        {"acc": float(hit), "acc_norm": float(norm)} for hit, norm in zip(hits, norm_hits, strict=True)
    ]
    assert "samples" not in result.raw
    # The fixture tells right from wrong: some right, not all; acc_norm apart; choice 0 as the answer differs.
    assert 0 < acc < 1 and acc != acc_norm and acc != sum(first_hits) / len(first_hits)


def test_truthfulqa_task_asks_for_its_file_and_a_bad_file_fails_before_any_model(tmp_path, fake_harness):
    with pytest.raises(
        LMEvalError, match=f"{TRUTHFULQA_TASK} runs on a TruthfulQA file you give.*--truthfulqa"
    ):
        run_lm_eval(_config("unused-model", tmp_path), None, ["mrpo_facts", TRUTHFULQA_TASK])
    bad = tmp_path / "task_mc.json"
    bad.write_text(json.dumps({"examples": [{"input": "Why?", "target_scores": {"a": 0, "b": 0}}]}))
    with pytest.raises(LMEvalError, match=f"TruthfulQA file {bad}: example 1 has no choice scored 1"):
        run_lm_eval(_config("unused-model", tmp_path), None, ["mrpo_facts"], truthfulqa=bad)
    assert not fake_harness[0]  # no task manager, no model: the file is checked first
    assert resolve_lm_eval_tasks([TRUTHFULQA_TASK], TRUTHFULQA_FIXTURE) == [TRUTHFULQA_TASK]  # not twice


def test_truthfulqa_runs_with_plain_lm_eval_include_path(tmp_path, capsys):
    from lm_eval.tasks import TaskManager

    from mrpo.cli import main

    assert main(["lm-eval-tasks", str(tmp_path / "tasks"), "--truthfulqa", str(TRUTHFULQA_FIXTURE)]) == 0
    captured = capsys.readouterr()
    directory = Path(captured.out.strip())
    assert f"--tasks mrpo_arithmetic,mrpo_facts,{TRUTHFULQA_TASK}" in captured.err
    assert TRUTHFULQA_TASK in TaskManager(include_path=str(directory), include_defaults=False).all_tasks
    assert directory.parent == (tmp_path / "tasks").resolve()  # the user's folder, not the package
    rows = [
        json.loads(line) for line in (directory / TRUTHFULQA_TASK / "test.jsonl").read_text().splitlines()
    ]
    assert rows == read_truthfulqa(TRUTHFULQA_FIXTURE)

    missing = tmp_path / "nowhere.json"
    assert main(["lm-eval-tasks", str(tmp_path / "tasks"), "--truthfulqa", str(missing)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"mrpo lm-eval-tasks: error: TruthfulQA file {missing}: not found")
    assert error.count("\n") == 1


def test_evaluate_with_truthfulqa_checks_the_file_first_then_runs_the_task(tmp_path, monkeypatch, capsys):
    import mrpo.evaluation
    import mrpo.lm_eval_bridge
    import mrpo.pipeline
    from mrpo.cli import main

    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        f"policy: {{model: unused-model}}\ndata: {{train: unused.jsonl}}\ncache_dir: {tmp_path}\n"
    )
    held_out, lm_eval_calls = [], []
    monkeypatch.setattr(mrpo.pipeline, "run_evaluate", lambda *a, **k: held_out.append(k) or ([], "out.json"))
    monkeypatch.setattr(mrpo.evaluation, "format_table", lambda results: "held-out table")
    monkeypatch.setattr(
        mrpo.lm_eval_bridge,
        "run_lm_eval",
        lambda *a, **k: lm_eval_calls.append((a, k)) or LMEvalResult("s", "m", [], {}),
    )
    bad = tmp_path / "task_mc.json"
    bad.write_text("[]")
    assert main(["evaluate", str(config_path), "--truthfulqa", str(bad)]) == 2
    assert f"TruthfulQA file {bad}: a JSON list, not an object" in capsys.readouterr().err
    assert not held_out  # the file is checked before the held-out evaluation

    assert main(["evaluate", str(config_path), "--truthfulqa", str(TRUTHFULQA_FIXTURE)]) == 0
    (_, checkpoint, tasks), options = lm_eval_calls[0]
    assert (
        checkpoint is None and tasks == [TRUTHFULQA_TASK] and options["truthfulqa"] == str(TRUTHFULQA_FIXTURE)
    )
