"""MRPOTrainer: K = 1 parity with TRL's DPOTrainer, training invariants (every parameter moves, resume, gradient
accumulation, several processes) and the logged §5 metrics.

Everything runs in float32 on CPU with dropout 0 and the sequential sampler, so two runs that should agree differ
only by floating-point summation order.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from mrpo.collator import PreferenceCollator, PreferenceDataset
from mrpo.config.schema import DataConfig, LoraConfig, LossConfig, MRPOConfig, PolicyConfig, ReferenceConfig
from mrpo.data.tokenization import ModelView
from mrpo.logprobs import sequence_logps
from mrpo.losses import mrpo_loss
from mrpo.models import load_policy
from mrpo.trainer import MRPOTrainer
from tiny_models import bpe_tokenizer, char_tokenizer, save_model_dir, tiny_gemma3, tiny_llama

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import trainer_worker as setup  # noqa: E402

SPEC_METRICS = (
    *setup.LOSS_METRIC_NAMES,
    "ctro/eps_chosen",
    "ctro/eps_rejected",
    "ctro/clip_rate",
)


def spec_metric_names(num_references: int) -> list[str]:
    """The logged §5 metrics; at K = 1 without alpha (1 by construction) and CTRO (nothing to clip)."""
    per_reference = [
        f"{name}{k}{suffix}"
        for k in range(1, num_references + 1)
        for name, suffix in (("ref", "/margin"), ("ref", "/accuracy"), ("alpha/ref", ""))
    ]
    names = [*SPEC_METRICS, *per_reference]
    return names if num_references > 1 else [n for n in names if not n.startswith(("alpha/", "ctro/"))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="module")
def llama_dir(workdir) -> Path:
    return save_model_dir(tiny_llama(), bpe_tokenizer(), workdir / "llama")


@pytest.fixture(scope="module")
def pairs():
    return setup.load_records(setup.standard_records())


@pytest.fixture(scope="module")
def dataset(pairs, llama_dir, workdir) -> PreferenceDataset:
    """The 8 standard pairs, K = 1 (the initialising reference = the saved starting model)."""
    return setup.build_dataset(pairs, [setup.initialising_reference(llama_dir)], workdir / "cache")


@pytest.fixture(scope="module")
def two_reference_dataset(pairs, llama_dir, workdir) -> PreferenceDataset:
    """The same pairs with a second, external reference of another family and tokenizer (char-level Gemma-3)."""
    gemma_dir = save_model_dir(tiny_gemma3(), char_tokenizer(), workdir / "gemma")
    references = [
        setup.initialising_reference(llama_dir),
        (
            ReferenceConfig(name="gemma", model=str(gemma_dir), dtype="float32"),
            ModelView(char_tokenizer(), name="gemma"),
        ),
    ]
    return setup.build_dataset(pairs, references, workdir / "cache")


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_logs(trainer) -> list[dict]:
    """The per-step training log lines (not the final summary)."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------------------------------------------------------
# 1. K = 1 is DPO: parity with TRL 1.16's DPOTrainer


def test_k1_matches_trl_dpo_trainer(pairs, dataset, llama_dir, workdir):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from trl import DPOConfig, DPOTrainer

    steps, beta = 3, 0.1
    start = tiny_llama()
    common = {
        "per_device_train_batch_size": 4,
        "max_steps": steps,
        "learning_rate": 0.5,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "train_sampling_strategy": "sequential",
        "disable_tqdm": True,
    }
    trl_args = DPOConfig(
        output_dir=str(workdir / "trl"),
        bf16=False,
        precompute_ref_log_probs=True,
        loss_type=["sigmoid"],
        beta=beta,
        max_length=None,
        **common,
    )
    records = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    trl_trainer = DPOTrainer(
        model=copy.deepcopy(start),
        args=trl_args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=bpe_tokenizer(),
    )
    # Same token ids: TRL appends the EOS text to standard completions, ModelView appends the EOS id.
    for ours, theirs in zip(dataset.pairs, trl_trainer.train_dataset, strict=True):
        for side in ("chosen", "rejected"):
            sequence = getattr(ours, side)
            assert list(sequence.input_ids) == theirs["prompt_ids"] + theirs[f"{side}_ids"]
            assert sequence.prompt_length == len(theirs["prompt_ids"])
    # Same reference log-probs: TRL's precompute (fused LM head) and our cache (chunked log-softmax).
    torch.testing.assert_close(
        dataset.reference_chosen_logps[0],
        torch.tensor(trl_trainer.train_dataset["ref_chosen_logps"]),
        rtol=1e-6,
        atol=1e-5,
    )
    trl_trainer.train()

    ours = setup.make_trainer(
        copy.deepcopy(start).train(),
        dataset,
        setup.training_arguments(
            workdir / "ours", **{k: v for k, v in common.items() if k != "disable_tqdm"}
        ),
        loss=LossConfig(beta=beta),
    )
    ours.train()

    theirs_logs, our_logs = train_logs(trl_trainer), train_logs(ours)
    assert len(theirs_logs) == len(our_logs) == steps
    compared = ("loss", "grad_norm", *setup.LOSS_METRIC_NAMES)
    for step, (theirs, mine) in enumerate(zip(theirs_logs, our_logs, strict=True), start=1):
        for name in setup.comparable(compared, theirs):
            assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-5), (step, name)
    # After 3 SGD steps of lr 0.5 the weights agree to float32 summation noise.
    trl_parameters = parameters(trl_trainer.model)
    for name, value in parameters(ours.model).items():
        torch.testing.assert_close(value, trl_parameters[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# 2. Every trainable parameter moves (full fine-tuning; LoRA: adapters only)


def test_full_fine_tuning_changes_every_parameter(dataset, workdir):
    model = tiny_llama().train()
    before = parameters(model)
    setup.make_trainer(model, dataset, setup.training_arguments(workdir / "full", max_steps=2)).train()
    after = parameters(model)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters that did not move: {unchanged}"


def test_lora_changes_every_adapter_and_no_base_weight(dataset, llama_dir, workdir):
    config = MRPOConfig(
        policy=PolicyConfig(model=str(llama_dir), dtype="float32"),
        data=DataConfig(train="unused.jsonl"),
        lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
    )
    model = load_policy(config)
    before = parameters(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # Two steps: lora_B starts at zero, so lora_A gets its first gradient in step 2.
    setup.make_trainer(model, dataset, setup.training_arguments(workdir / "lora", max_steps=2)).train()
    after = parameters(model)
    unchanged = sorted(name for name in trainable if torch.equal(before[name], after[name]))
    assert not unchanged, f"adapter parameters that did not move: {unchanged}"
    moved_base = sorted(
        name for name in before if name not in trainable and not torch.equal(before[name], after[name])
    )
    assert not moved_base, f"base weights that moved: {moved_base}"


@pytest.mark.skipif(
    torch.accelerator.is_available(), reason="pinning memory is refused only without accelerator"
)
def test_a_cpu_lora_run_warns_neither_about_pinned_memory_nor_the_checkpointing_name(
    dataset, llama_dir, workdir, recwarn
):
    from mrpo.models import load_for_evaluation

    config = MRPOConfig(
        policy=PolicyConfig(model=str(llama_dir), dtype="float32"),
        data=DataConfig(train="unused.jsonl"),
        lora=LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    # As a user's CPU machine builds them: no use_cpu, so the Trainer's default of pinning memory.
    args = setup.training_arguments(workdir / "quiet", use_cpu=False, remove_unused_columns=True)
    trainer = setup.make_trainer(load_policy(config), dataset, args, eval_dataset=dataset)
    trainer.train()
    trainer.evaluate()
    trainer.save_model(str(workdir / "quiet" / "final"))
    load_for_evaluation(config, str(workdir / "quiet" / "final"), torch.device("cpu"))
    noise = [
        str(w.message) for w in recwarn if "pin_memory" in str(w.message) or "checkpointing" in str(w.message)
    ]
    assert not noise
    assert args.dataloader_pin_memory and args.remove_unused_columns  # the caller's arguments as they were
    assert not trainer.args.dataloader_pin_memory and not trainer.args.remove_unused_columns


def test_the_final_train_loss_is_the_mean_over_every_step_across_a_resume(dataset, workdir):
    overrides = {"max_steps": 5, "logging_steps": 2, "per_device_train_batch_size": 2, "save_strategy": "steps",
                 "save_steps": 3}  # fmt: skip
    whole = setup.make_trainer(
        tiny_llama().train(), dataset, setup.training_arguments(workdir / "mean-whole", **overrides)
    )
    uninterrupted = whole.train()
    split_dir = workdir / "mean-split"
    setup.make_trainer(
        tiny_llama().train(), dataset, setup.training_arguments(split_dir, **overrides)
    ).train()
    resumed = setup.make_trainer(
        tiny_llama().train(), dataset, setup.training_arguments(split_dir, **overrides)
    )
    output = resumed.train(resume_from_checkpoint=str(split_dir / "checkpoint-3"))
    assert output.training_loss == pytest.approx(uninterrupted.training_loss, abs=1e-6)
    assert output.metrics["train_loss"] == output.training_loss
    # Logged: every second step, the checkpoint's step (a resume starts there) and the last step.
    assert [entry["step"] for entry in train_logs(resumed)] == [2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------------------------
# 3. Resume reproduces the uninterrupted trajectory


def test_resume_from_checkpoint_reproduces_the_loss_trajectory(dataset, workdir):
    # AdamW (optimizer state must be restored) and the default random sampler (its position must be restored).
    overrides = {
        "per_device_train_batch_size": 2,
        "max_steps": 6,  # 4 steps per epoch: the resumed part crosses an epoch boundary
        "optim": "adamw_torch",
        "learning_rate": 1e-2,
        "train_sampling_strategy": "random",
        "save_strategy": "steps",
        "save_steps": 3,
    }
    whole = setup.make_trainer(
        tiny_llama().train(), dataset, setup.training_arguments(workdir / "whole", **overrides)
    )
    whole.train()

    split_dir = workdir / "split"
    first = setup.make_trainer(
        tiny_llama().train(), dataset, setup.training_arguments(split_dir, **overrides)
    )
    first.train()
    checkpoint = split_dir / "checkpoint-3"
    assert checkpoint.is_dir()
    shutil.rmtree(split_dir / "checkpoint-6")  # what an interrupted run would have left
    resumed = setup.make_trainer(
        tiny_llama(seed=1).train(), dataset, setup.training_arguments(split_dir, **overrides)
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    expected = {entry["step"]: entry for entry in train_logs(whole)}
    # The resumed state's log history starts with the checkpoint's (steps 1-3), then the new steps.
    got = {entry["step"]: entry for entry in train_logs(resumed)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        for name in ("loss", *setup.LOSS_METRIC_NAMES):
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-5, abs=1e-5), (step, name)
    whole_parameters = parameters(whole.model)
    for name, value in parameters(resumed.model).items():
        torch.testing.assert_close(value, whole_parameters[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# 4. Gradient accumulation: batch 8 x 1 == batch 1 x 8


def test_gradient_accumulation_matches_the_large_batch(dataset, workdir):
    start = tiny_llama()
    results = []
    for batch, accumulation in ((8, 1), (1, 8)):
        model = copy.deepcopy(start).train()
        args = setup.training_arguments(
            workdir / f"ga-{batch}x{accumulation}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            max_grad_norm=0.0,  # no clipping: the test is about the gradient itself
        )
        trainer = setup.make_trainer(model, dataset, args)
        trainer.train()
        results.append((parameters(model), train_logs(trainer)))
    (large, large_logs), (small, small_logs) = results
    moved = max((large[name] - p).abs().max().item() for name, p in parameters(start).items())
    assert moved > 1e-3, "the steps must move the weights for the comparison to mean something"
    for name, value in small.items():
        torch.testing.assert_close(value, large[name], rtol=1e-5, atol=1e-6, msg=name)
    for big_step, small_step in zip(large_logs, small_logs, strict=True):
        for name in setup.comparable(("loss", *setup.LOSS_METRIC_NAMES), big_step):
            assert small_step[name] == pytest.approx(big_step[name], rel=1e-5, abs=1e-6), name


# ---------------------------------------------------------------------------------------------------------------
# 5. Two processes (gloo, CPU) == one process with the same global batch


def _launch_worker(command: list[str], out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return (
        json.loads((out_dir / "result.json").read_text()),
        torch.load(out_dir / "parameters.pt", weights_only=True),
    )


@pytest.mark.parametrize(
    "micro_batch_tokens",
    [None, pytest.param(1, marks=pytest.mark.slow, id="each-pair-its-own-micro-batch")],
)
def test_two_processes_match_one_process(llama_dir, workdir, micro_batch_tokens):
    worker = str(SCRIPTS / "trainer_worker.py")
    budget = [] if micro_batch_tokens is None else ["--micro-batch-tokens", str(micro_batch_tokens)]
    single_out = workdir / f"one-process-{micro_batch_tokens}"
    double_out = workdir / f"two-processes-{micro_batch_tokens}"
    single, single_parameters = _launch_worker(
        [sys.executable, worker, str(llama_dir), str(workdir / "cache-1p"), str(single_out),
         "--per-device-batch", "4", "--max-steps", "4"],
        single_out,
    )  # fmt: skip
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    double, double_parameters = _launch_worker(
        [*accelerate, "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"), "--num_processes", "2",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
         worker, str(llama_dir), str(workdir / "cache-2p"), str(double_out),
         "--per-device-batch", "2", "--max-steps", "4", "--world-size", "2", *budget],
        double_out,
    )  # fmt: skip
    assert (single["world_size"], double["world_size"]) == (1, 2)
    single_logs = [entry for entry in single["log_history"] if "loss" in entry]
    double_logs = [entry for entry in double["log_history"] if "loss" in entry]
    assert len(single_logs) == len(double_logs) == 4
    for one, two in zip(single_logs, double_logs, strict=True):
        # The metrics are reduced over both processes at log time: they are means over the global batch of 4.
        for name in setup.comparable(("loss", *spec_metric_names(1)), one):
            assert two[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), (one["step"], name)
    for name, value in double_parameters.items():
        torch.testing.assert_close(value, single_parameters[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# 9. Logged and evaluated metrics are the means of the per-pair statistics


class RecordExpectedStatistics(TrainerCallback):
    """Before each optimizer step, recomputes the step's per-pair statistics from the weights the step starts with."""

    def __init__(self, dataset: PreferenceDataset, batch_size: int, loss: LossConfig):
        self.dataset, self.batch_size, self.loss = dataset, batch_size, loss
        self.collator = PreferenceCollator(pad_token_id=bpe_tokenizer().pad_token_id)
        self.per_step: list[dict[str, torch.Tensor]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        start = state.global_step * self.batch_size % len(self.dataset)
        batch = self.collator([self.dataset[i] for i in range(start, start + self.batch_size)])
        self.per_step.append(expected_statistics(model, batch, self.loss))


def expected_statistics(model, batch, loss: LossConfig) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        policy = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        size = batch["reference_chosen_logps"].shape[1]
        chosen, rejected = policy.logps[:size], policy.logps[size:]
        reference_chosen, reference_rejected = (
            batch["reference_chosen_logps"],
            batch["reference_rejected_logps"],
        )
        if loss.length_normalize:  # by hand: every log-prob over the policy's completion token count (§7)
            chosen_tokens, rejected_tokens = policy.token_counts[:size], policy.token_counts[size:]
            chosen, reference_chosen = chosen / chosen_tokens, reference_chosen / chosen_tokens
            rejected, reference_rejected = rejected / rejected_tokens, reference_rejected / rejected_tokens
        output = mrpo_loss(
            chosen,
            rejected,
            reference_chosen,
            reference_rejected,
            beta=loss.beta,
            weights=loss.weights,
            clip=loss.clip,
            eps=loss.eps,
            aggregation=loss.aggregation,
            align=loss.align,
        )
    return {**output.pair_statistics(), "loss": output.losses}


def test_logged_metrics_are_means_of_per_pair_statistics_over_the_logging_window(
    two_reference_dataset, workdir
):
    loss = LossConfig(beta=0.1, eps=0.1)
    recorder = RecordExpectedStatistics(two_reference_dataset, batch_size=2, loss=loss)
    args = setup.training_arguments(
        workdir / "metrics", per_device_train_batch_size=2, max_steps=4, logging_steps=2
    )
    trainer = setup.make_trainer(
        tiny_llama().train(), two_reference_dataset, args, loss=loss, callbacks=[recorder]
    )
    trainer.train()
    logs = train_logs(trainer)
    assert [entry["step"] for entry in logs] == [2, 4]
    names = spec_metric_names(2)
    assert len(recorder.per_step) == 4
    for index, entry in enumerate(logs):
        window = recorder.per_step[2 * index : 2 * index + 2]
        for name in names:
            expected = torch.cat([step[name] for step in window]).mean().item()
            assert entry[name] == pytest.approx(expected, rel=1e-5, abs=1e-6), (entry["step"], name)
    # Sanity of the two-reference numbers: weights sum to 1 and the char-level Gemma reference gets clipped.
    for entry in logs:
        assert entry["alpha/ref1"] + entry["alpha/ref2"] == pytest.approx(1.0, abs=1e-6)
        assert 0.0 <= entry["ctro/clip_rate"] <= 1.0


def test_k1_logs_neither_alpha_nor_ctro(dataset, workdir):
    # At K = 1 alpha/ref1 is 1 and CTRO has nothing to clip: logged, they would only look like findings.
    args = setup.training_arguments(workdir / "k1-logs", max_steps=1)
    trainer = setup.make_trainer(tiny_llama().train(), dataset, args, eval_dataset=dataset)
    trainer.train()
    logged = set(train_logs(trainer)[0]) | set(trainer.evaluate())
    assert {"ref1/margin", "ref1/accuracy", "eval_ref1/accuracy", "rewards/accuracies"} <= logged
    assert sorted(key for key in logged if "alpha/" in key or "ctro/" in key) == []


@pytest.mark.parametrize("loss", [LossConfig(beta=0.2), LossConfig(beta=2.0, length_normalize=True)])
def test_evaluate_returns_the_means_over_the_eval_set(two_reference_dataset, workdir, loss):
    model = tiny_llama(seed=1).train()  # not the reference's weights: the pairs' losses differ
    args = setup.training_arguments(
        workdir / f"eval-{loss.length_normalize}", per_device_eval_batch_size=3
    )  # 8 pairs: batches 3, 3, 2
    trainer = setup.make_trainer(
        model, two_reference_dataset, args, eval_dataset=two_reference_dataset, loss=loss
    )
    metrics = trainer.evaluate()

    model.eval()
    collator = PreferenceCollator(pad_token_id=bpe_tokenizer().pad_token_id)
    batch = collator([two_reference_dataset[i] for i in range(len(two_reference_dataset))])
    expected = expected_statistics(model, batch, loss)
    for name in spec_metric_names(2):
        assert metrics[f"eval_{name}"] == pytest.approx(expected[name].mean().item(), rel=1e-5, abs=1e-6), (
            name
        )
    # Trainer repeats each batch's mean loss eval_batch_size times and cuts at the number of pairs: the pair mean.
    assert metrics["eval_loss"] == pytest.approx(expected["loss"].mean().item(), rel=1e-5, abs=1e-6)
    # The train accumulator was not touched by evaluation, and the eval one was emptied by the evaluation loop.
    assert trainer._metrics["train"].sums is None and trainer._metrics["eval"].sums is None


def test_evaluation_statistics_go_under_the_callers_prefix_and_leave_the_train_window_alone(
    two_reference_dataset, workdir
):
    runs = []
    for evaluating in (False, True):
        overrides = {"eval_strategy": "steps", "eval_steps": 1} if evaluating else {}
        args = setup.training_arguments(
            workdir / f"eval-window-{evaluating}", per_device_train_batch_size=2, max_steps=2, logging_steps=2,
            **overrides,
        )  # fmt: skip
        eval_dataset = two_reference_dataset if evaluating else None
        trainer = setup.make_trainer(
            tiny_llama().train(), two_reference_dataset, args, eval_dataset=eval_dataset
        )
        trainer.train()
        runs.append(trainer)
    plain, evaluated = runs
    # An evaluation at step 1, between two train lines, leaves the train window (steps 1 and 2) whole.
    (plain_line,), (evaluated_line,) = train_logs(plain), train_logs(evaluated)
    for name in ("loss", "num_tokens", *spec_metric_names(2)):
        assert evaluated_line[name] == pytest.approx(plain_line[name], rel=1e-6), name
    assert [entry["step"] for entry in evaluated.state.log_history if "eval_loss" in entry] == [1, 2]
    metrics = evaluated.evaluate(metric_key_prefix="held_out")
    assert {f"held_out_{name}" for name in spec_metric_names(2)} <= set(metrics)
    assert not [key for key in metrics if not key.startswith("held_out_") and key != "epoch"]
    assert evaluated.state.log_history[-1] == {**metrics, "step": 2}


def test_only_an_evaluations_line_counts_as_one():
    from mrpo.trainer import is_evaluation_log

    evaluation = {
        "held_loss": 0.6,
        "held_ref1/accuracy": 0.5,
        "held_runtime": 0.1,
        "held_samples_per_second": 9.0,
    }
    assert is_evaluation_log(evaluation)
    assert is_evaluation_log({"train_loss": 0.6, "train_runtime": 0.1})  # evaluate(metric_key_prefix="train")
    summary = {"train_runtime": 1.0, "train_samples_per_second": 8.0, "total_flos": 3.0, "train_loss": 0.6}
    assert not is_evaluation_log(summary)
    assert not is_evaluation_log({"loss": 0.6, "grad_norm": 1.0, "learning_rate": 0.5})


# ---------------------------------------------------------------------------------------------------------------
# MRPOTrainer on transformers' public API: the few private parts it needs are listed, and checked here


def test_the_private_trainer_parts_mrpo_uses_are_listed_and_transformers_still_uses_them():
    """Fails when transformers renames, removes or stops calling one of ``TRAINER_INTERNALS`` (an override that is
    no longer called would be silently ignored), and when trainer.py uses a private part it does not list."""
    import ast
    import inspect
    import re

    import transformers.trainer
    from transformers import Trainer

    from mrpo import trainer as mrpo_trainer
    from mrpo.trainer import TRAINER_INTERNALS

    source = inspect.getsource(transformers.trainer)
    for name in TRAINER_INTERNALS:
        assert re.search(rf"\bself\.{name}\b", source), f"transformers.Trainer no longer uses {name}"
    for hook in ("_save_checkpoint", "_track_num_input_tokens", "_prepare_inputs"):
        assert callable(getattr(Trainer, hook, None)), f"transformers.Trainer.{hook} is gone"
        assert f"self.{hook}(" in source, f"transformers.Trainer no longer calls {hook}"

    def trainer_uses(name: str) -> bool:
        return hasattr(Trainer, name) or re.search(rf"\bself\.{name}\b", source) is not None

    tree = ast.parse(inspect.getsource(mrpo_trainer))
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, (ast.Name, ast.Call))
        and (
            getattr(node.value, "id", None) == "self"
            or getattr(getattr(node.value, "func", None), "id", None) == "super"
        )
    }
    used |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    private = sorted(
        name for name in used if name.startswith("_") and not name.startswith("__") and trainer_uses(name)
    )
    assert private == sorted(name for name in TRAINER_INTERNALS if name.startswith("_"))


def test_the_callers_training_arguments_are_left_as_they_were(dataset, workdir):
    import dataclasses

    args = setup.training_arguments(workdir / "arguments", remove_unused_columns=True)
    before = dataclasses.asdict(args)
    for trainer in (
        setup.make_trainer(tiny_llama(), dataset, args),
        MRPOTrainer(
            tiny_llama(), args, train_dataset=dataset, data_collator=PreferenceCollator(pad_token_id=0)
        ),
    ):
        assert trainer.args is not args and not trainer.args.remove_unused_columns
    assert dataclasses.asdict(args) == before


# ---------------------------------------------------------------------------------------------------------------
# Padding-free batches train exactly like padded ones


def test_padding_free_training_matches_padded(two_reference_dataset, workdir):
    start = tiny_llama()
    results = []
    for padding_free in (False, True):
        model = copy.deepcopy(start).train()
        args = setup.training_arguments(
            workdir / f"packed-{padding_free}", per_device_train_batch_size=4, max_steps=2, max_grad_norm=0.0
        )
        trainer = setup.make_trainer(model, two_reference_dataset, args, padding_free=padding_free)
        trainer.train()
        results.append((parameters(model), train_logs(trainer)))
    (padded, padded_logs), (packed, packed_logs) = results
    for name, value in packed.items():
        torch.testing.assert_close(value, padded[name], rtol=1e-5, atol=1e-6, msg=name)
    for padded_step, packed_step in zip(padded_logs, packed_logs, strict=True):
        for name in ("loss", *setup.LOSS_METRIC_NAMES):
            assert packed_step[name] == pytest.approx(padded_step[name], rel=1e-5, abs=1e-6), name


@pytest.mark.slow  # compiling takes about a minute on 2 CPU cores
def test_compiled_decoder_layers_train_like_eager(two_reference_dataset, workdir):
    from mrpo.models import compile_decoder_layers

    start = tiny_llama()
    results = []
    for compiled in (False, True):
        model = copy.deepcopy(start).train()
        if compiled:
            compile_decoder_layers(model)
        args = setup.training_arguments(
            workdir / f"compiled-{compiled}", per_device_train_batch_size=4, max_steps=2
        )
        trainer = setup.make_trainer(model, two_reference_dataset, args, padding_free=True)
        trainer.train()
        results.append(train_logs(trainer))
    for eager_step, compiled_step in zip(*results, strict=True):
        assert compiled_step["loss"] == pytest.approx(eager_step["loss"], rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Token-budget micro-batches train exactly like the whole batch


def _budget_that_splits_unevenly(dataset, batch_size: int, padded: bool) -> int:
    """A budget under which the first batch splits into micro-batches of different sizes."""
    from mrpo.batching import token_budget_groups

    lengths = [
        (len(dataset[i]["chosen_input_ids"]), len(dataset[i]["rejected_input_ids"]))
        for i in range(batch_size)
    ]
    for budget in range(1, 10_000):
        sizes = {len(group) for group in token_budget_groups(lengths, budget, padded=padded, bucketed=True)}
        if len(sizes) > 1:
            return budget
    raise AssertionError("no budget splits the batch unevenly")


@pytest.mark.parametrize("padding_free", [False, True])
def test_token_budget_micro_batches_train_like_the_whole_batch(two_reference_dataset, workdir, padding_free):
    start = tiny_llama()
    padded = not padding_free
    uneven_of_8 = _budget_that_splits_unevenly(two_reference_dataset, 8, padded=padded)
    uneven_of_4 = _budget_that_splits_unevenly(two_reference_dataset, 4, padded=padded)
    # The micro-batches' rows are padded to their length buckets (batching.bucket_length), beyond their pairs.
    split = PreferenceCollator(pad_token_id=0, padding_free=padding_free, micro_batch_tokens=uneven_of_8)(
        [two_reference_dataset[i] for i in range(8)]
    )["micro_batches"]
    real = [
        int((b["sequence_index"] >= 0).sum() if padding_free else b["attention_mask"].sum(1).max())
        for b in split
    ]
    assert any(b["input_ids"].shape[-1] > n for b, n in zip(split, real, strict=True))
    results = []
    # 8 pairs per optimizer step throughout: one batch of 8 whole, split per pair, split unevenly, and two
    # accumulated batches of 4, each split unevenly (micro-batch weights inside accumulation steps).
    for budget, batch, accumulation in ((None, 8, 1), (1, 8, 1), (uneven_of_8, 8, 1), (uneven_of_4, 4, 2)):
        model = copy.deepcopy(start).train()
        args = setup.training_arguments(
            workdir / f"budget-{padding_free}-{budget}-{accumulation}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            max_grad_norm=0.0,
        )
        trainer = setup.make_trainer(
            model, two_reference_dataset, args, padding_free=padding_free, micro_batch_tokens=budget
        )
        trainer.train()
        results.append((parameters(model), train_logs(trainer)))
    (whole, whole_logs), *split_runs = results
    moved = max((whole[name] - p).abs().max().item() for name, p in parameters(start).items())
    assert moved > 1e-3
    for split, split_logs in split_runs:
        for name, value in split.items():
            torch.testing.assert_close(value, whole[name], rtol=1e-5, atol=1e-6, msg=name)
        for whole_step, split_step in zip(whole_logs, split_logs, strict=True):
            for name in ("loss", *setup.LOSS_METRIC_NAMES):
                assert split_step[name] == pytest.approx(whole_step[name], rel=1e-5, abs=1e-6), name


def test_token_budget_micro_batches_evaluate_like_the_whole_batch(two_reference_dataset, workdir):
    model = tiny_llama(seed=1).eval()
    metrics = []
    for budget in (None, 1, _budget_that_splits_unevenly(two_reference_dataset, 3, padded=True)):
        args = setup.training_arguments(workdir / f"eval-budget-{budget}", per_device_eval_batch_size=3)
        trainer = setup.make_trainer(
            model, two_reference_dataset, args, eval_dataset=two_reference_dataset, micro_batch_tokens=budget
        )
        metrics.append(trainer.evaluate())
    whole, *splits = metrics
    for split in splits:
        for name in ("eval_loss", *(f"eval_{name}" for name in spec_metric_names(2))):
            assert split[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-6), name


def test_token_budget_is_refused_under_deepspeed(two_reference_dataset, workdir):
    from mrpo.errors import ConfigError

    args = setup.training_arguments(workdir / "deepspeed-budget")
    trainer = setup.make_trainer(tiny_llama(), two_reference_dataset, args, micro_batch_tokens=64)
    trainer.is_deepspeed_enabled = True  # what Trainer.__init__ sets from accelerate's DeepSpeed plugin
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        trainer._refuse_unsupported_micro_batches()
    trainer.data_collator.micro_batch_tokens = None
    trainer._refuse_unsupported_micro_batches()  # without a budget DeepSpeed is fine


def test_token_budget_is_refused_with_inputs_for_metrics(two_reference_dataset, workdir):
    from mrpo.errors import ConfigError

    args = setup.training_arguments(workdir / "inputs-budget", include_for_metrics=["inputs"])
    with pytest.raises(ConfigError, match="include_for_metrics"):
        setup.make_trainer(tiny_llama(), two_reference_dataset, args, micro_batch_tokens=64)


def test_split_batches_count_their_tokens_and_flops(two_reference_dataset, workdir):
    counted = []
    for budget in (None, 1):
        args = setup.training_arguments(
            workdir / f"tokens-{budget}", per_device_train_batch_size=4, max_steps=2,
            include_num_input_tokens_seen="all",
        )  # fmt: skip
        trainer = setup.make_trainer(
            tiny_llama().train(),
            two_reference_dataset,
            args,
            padding_free=True,
            micro_batch_tokens=budget,
            pad_to_multiple_of=1,  # exact lengths: a bucket would add padding to the split rows' work
        )
        trainer.train()
        counted.append((trainer.state.num_input_tokens_seen, trainer.state.total_flos))
    (tokens, flos), (split_tokens, split_flos) = counted
    assert tokens > 0 and split_tokens == tokens  # packed rows: every token is a real one, split or not
    assert flos > 0 and split_flos == pytest.approx(flos)


# ---------------------------------------------------------------------------------------------------------------
# Host-device syncs of a training step


class StepSyncs(TrainerCallback):
    """The syncs (tests/sync_counter.py) made from the start of one step to the start of the next."""

    def __init__(self, counter):
        self.counter, self.starts = counter, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(len(self.counter.syncs))

    def step(self, index: int) -> list[tuple[str, str, str]]:
        return self.counter.syncs[self.starts[index] : self.starts[index + 1]]


@pytest.mark.parametrize("split", [False, True])
def test_a_training_step_makes_one_sync_of_its_own(dataset, workdir, split):
    """Counted on the CPU as they would happen on an accelerator, over a step without a log line. mrpo's own: one,
    the check of the loss's inputs before the optimizer step, whatever the number of micro-batches. Before: a
    check and a blocking upload (the metric count) per forward, and the Trainer's NaN filter (two reads of the
    loss) -- 4 a padded step, 2 + 2 per micro-batch a split one. What remains is not mrpo's: accelerate's blocking
    upload of each batch tensor and, with sdpa, transformers' mask builder (two reads a forward on padded rows)."""
    from sync_counter import SyncCounter

    model = tiny_llama().train()
    budget = _budget_that_splits_unevenly(dataset, 4, padded=True) if split else None
    args = setup.training_arguments(
        workdir / f"syncs-{split}", max_steps=3, logging_steps=100, max_grad_norm=1.0
    )
    trainer = setup.make_trainer(model, dataset, args, micro_batch_tokens=budget)
    counter = SyncCounter(model)
    steps = StepSyncs(counter)
    trainer.add_callback(steps)
    with counter:
        trainer.train()
    syncs = steps.step(1)  # the second step: no log line, nothing built for the first time
    table = "\n".join(f"{kind} {name} {where}" for kind, name, where in syncs)
    own = [where for _, _, where in syncs if "/mrpo/" in where]
    assert len(own) == 1 and "_check_step_logps" in own[0], table
    assert not [where for _, _, where in syncs if "/transformers/trainer.py" in where], table
    if not split:
        assert len(syncs) == 9, table  # 1 + 6 batch tensors uploaded + 2 mask reads


# ---------------------------------------------------------------------------------------------------------------
# Non-finite log-probs stop training with the step, the pair id and a remedy


def test_a_diverged_policy_stops_training_naming_the_step_and_pair(dataset, workdir):
    from mrpo.errors import TrainingError

    model = tiny_llama().train()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # every hidden state, hence every log-prob, is NaN
    args = setup.training_arguments(workdir / "diverged", per_device_train_batch_size=4, max_steps=2)
    trainer = setup.make_trainer(model, dataset, args)
    first_pair = dataset.pairs[0].pair_id
    with pytest.raises(
        TrainingError, match=rf"training step 1: the policy's log-prob of pair '{first_pair}'"
    ):
        trainer.train()


def test_a_non_finite_cached_reference_names_the_reference_and_pair(dataset, workdir):
    from mrpo.errors import TrainingError

    chosen = dataset.reference_chosen_logps.clone()
    chosen[0, 2] = float("inf")
    broken = PreferenceDataset(dataset.pairs, chosen, dataset.reference_rejected_logps)
    args = setup.training_arguments(workdir / "bad-reference", per_device_eval_batch_size=4)
    trainer = setup.make_trainer(tiny_llama(), broken, args, eval_dataset=broken)
    with pytest.raises(TrainingError, match=rf"evaluation: the cached log-prob of reference 1 for pair "
                                            rf"'{dataset.pairs[2].pair_id}'"):  # fmt: skip
        trainer.evaluate()


def test_cli_prints_a_training_error_on_one_line(monkeypatch, tmp_path, capsys):
    import mrpo.pipeline
    from mrpo.cli import main
    from mrpo.errors import TrainingError

    def diverge(config, resume=None, overwrite=False):
        raise TrainingError("training step 7: the policy's log-prob of pair 'p1' is not finite")

    monkeypatch.setattr(mrpo.pipeline, "run_train", diverge)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
    assert main(["train", str(config), f"training.output_dir={tmp_path}"]) == 1
    assert capsys.readouterr().err.strip() == (
        "mrpo train: error: training step 7: the policy's log-prob of pair 'p1' is not finite"
    )


# ---------------------------------------------------------------------------------------------------------------
# 5b. FSDP (version 2, accelerate) with two CPU processes over gloo == one process; a kill -9 and a resume change
#     nothing


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
# The shipped FSDP config as it is, sized down to the test: 2 processes, no mixed precision (CPU float32 parity).
FSDP2 = ["--config_file", str(ACCELERATE_CONFIGS / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
         "--dynamo_backend", "no"]  # fmt: skip


def _launch_fsdp(worker: str, llama_dir, cache: Path, out: Path, *extra: str, expect_exit: int = 0) -> None:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    port = ["--main_process_port", str(29000 + (os.getpid() + len(str(out))) % 900)]
    command = [*accelerate, *FSDP2, *port, worker, str(llama_dir), str(cache), str(out),
               "--per-device-batch", "2", "--max-steps", "4", "--world-size", "2", *extra]  # fmt: skip
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == expect_exit or (expect_exit and result.returncode != 0), result.stderr[-3000:]


def test_fsdp2_on_two_processes_matches_one_process_and_resumes_bit_exactly_after_a_kill(llama_dir, workdir):
    worker = str(SCRIPTS / "trainer_worker.py")
    single_out, fsdp_out, killed_out = workdir / "fsdp-1p", workdir / "fsdp-2p", workdir / "fsdp-killed"
    _, single = _launch_worker(
        [sys.executable, worker, str(llama_dir), str(workdir / "cache-f1"), str(single_out),
         "--per-device-batch", "4", "--max-steps", "4"],
        single_out,
    )  # fmt: skip
    _launch_fsdp(worker, llama_dir, workdir / "cache-f2", fsdp_out)
    fsdp = torch.load(fsdp_out / "parameters.pt", weights_only=True)
    for name, value in fsdp.items():  # the full (gathered) weights after 4 SGD steps of lr 0.5
        torch.testing.assert_close(value, single[name], rtol=1e-5, atol=1e-6, msg=name)
    # kill -9 of both processes before step 3, after checkpoint-2; then --resume: the same weights, bit for bit.
    _launch_fsdp(worker, llama_dir, workdir / "cache-f3", killed_out, "--save-steps", "2", "--die-at-step", "3",
                 expect_exit=137)  # fmt: skip
    assert not (killed_out / "parameters.pt").exists() and (killed_out / "run" / "checkpoint-2").is_dir()
    _launch_fsdp(worker, llama_dir, workdir / "cache-f3", killed_out, "--save-steps", "2", "--resume")
    resumed = torch.load(killed_out / "parameters.pt", weights_only=True)
    for name, value in resumed.items():
        assert torch.equal(value, fsdp[name]), name


def test_fsdp2_lora_on_two_processes_matches_one_process(llama_dir, workdir):
    worker = str(SCRIPTS / "trainer_worker.py")
    single_out, fsdp_out = workdir / "fsdp-lora-1p", workdir / "fsdp-lora-2p"
    _, single = _launch_worker(
        [sys.executable, worker, str(llama_dir), str(workdir / "cache-l1"), str(single_out),
         "--per-device-batch", "4", "--max-steps", "4", "--lora", "4"],
        single_out,
    )  # fmt: skip
    _launch_fsdp(worker, llama_dir, workdir / "cache-l2", fsdp_out, "--lora", "4")
    fsdp = torch.load(fsdp_out / "parameters.pt", weights_only=True)
    adapters = [name for name in single if "lora_" in name]
    assert adapters and any(
        (single[name] != 0).any() for name in adapters if "lora_B" in name
    )  # they trained
    for name, value in fsdp.items():
        torch.testing.assert_close(value, single[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS / name))
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    if name == "fsdp.yaml":
        assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    else:
        assert config.distributed_type == "MULTI_GPU"
