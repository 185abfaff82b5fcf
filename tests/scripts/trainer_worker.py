"""Shared set-up of the trainer tests, and a worker that `accelerate launch` runs for the multi-process test.

Imported by tests/test_trainer.py (the helpers) and run as a script by it::

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/trainer_worker.py MODEL_DIR CACHE_DIR OUT_DIR \\
        --per-device-batch 2 --max-steps 4 --world-size 2

(``--multi_gpu`` on a machine without GPUs: torchrun spawns the processes and `use_cpu=True` makes them CPU/gloo.
``accelerate launch --cpu --num_processes 2`` would start ONE process in accelerate 1.15, hence ``--world-size``.)

The worker trains the tiny policy on `standard_records()` with plain SGD and the sequential sampler (so the data
order is the dataset order on every process count), then process 0 writes `OUT_DIR/result.json` (the log history
and the world size) and `OUT_DIR/parameters.pt` (the final state dict).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

from mrpo.collator import PreferenceCollator, PreferenceDataset  # noqa: E402
from mrpo.config.schema import LossConfig, ReferenceConfig  # noqa: E402
from mrpo.data.pairs import PreferencePair  # noqa: E402
from mrpo.data.sources import pairs_from_records  # noqa: E402
from mrpo.data.tokenization import ModelView, tokenize_for_models  # noqa: E402
from mrpo.references import precompute  # noqa: E402
from mrpo.trainer import MRPOTrainer  # noqa: E402
from tiny_models import bpe_tokenizer  # noqa: E402

LOSS_METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def comparable(names, log: dict) -> list[str]:
    """The metric names two runs must agree on in this log line.

    While the policy still equals its reference (the first logged step of a run starting from it), every reward is
    float32 noise around 0 and ``rewards/accuracies`` is the sign of that noise: it differs between two correct
    implementations, batch shapes or CPUs (seen: an AMD EPYC gives other noise than an Intel Xeon). Left out then.
    """
    tied = abs(log["rewards/chosen"]) < 1e-5 and abs(log["rewards/rejected"]) < 1e-5
    return [name for name in names if not (tied and name == "rewards/accuracies")]


def standard_records() -> list[dict[str, str]]:
    """Eight standard-format pairs. No prompt/completion boundary merges for the BPE tokenizer, so TRL (which
    splits at the common prefix of prompt and prompt + completion) and ModelView produce the same token ids."""
    rows = [
        ("The capital of France is", " Paris.", " Rome, the capital of Italy."),
        ("Two plus two is", " four.", " six."),
        ("The sky is", " blue.", " green and red."),
        ("Water boils at", " 100 degrees Celsius.", " 50 degrees."),
        ("A cat is", " an animal.", " a flower."),
        ("Three plus three is", " six.", " nine, I think."),
        ("The quick brown fox", " jumps over the lazy dog.", " sleeps."),
        ("The capital of Italy is", " Rome.", " Paris."),
    ]
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows]


def conversational_records() -> list[dict[str, Any]]:
    """Four conversational pairs (message lists)."""
    rows = [
        ("Capital of Spain?", "Madrid.", "Paris, I think."),
        ("What is 2 + 2?", "4", "5"),
        ("Colour of the sky?", "Blue.", "Green, mostly."),
        ("Is a cat an animal?", "Yes.", "No, a flower."),
    ]
    return [
        {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        for question, chosen, rejected in rows
    ]


def load_records(records: list[dict[str, Any]]) -> list[PreferencePair]:
    return list(pairs_from_records(records))


def build_dataset(
    pairs: list[PreferencePair],
    references: list[tuple[ReferenceConfig, ModelView]],
    cache_dir: str | os.PathLike,
    policy_view: ModelView | None = None,
) -> PreferenceDataset:
    """The real data path: tokenize jointly for the policy and every reference, precompute, attach the columns."""
    policy_view = policy_view or ModelView(bpe_tokenizer(), name="policy")
    views = [policy_view, *(view for _, view in references)]
    tokenization = tokenize_for_models(pairs, views, max_length=None)
    assert len(tokenization.pair_ids) == len(pairs), tokenization.summary()
    cache = precompute(
        [spec for spec, _ in references],
        [view for _, view in references],
        tokenization.per_view[1:],
        cache_dir,
        device="cpu",
        show_progress=False,
    )
    columns = cache.columns(tokenization.pair_ids)
    return PreferenceDataset(
        tokenization.per_view[0], columns["reference_chosen_logps"], columns["reference_rejected_logps"]
    )


def initialising_reference(model_dir: str | os.PathLike) -> tuple[ReferenceConfig, ModelView]:
    return ReferenceConfig(name="init", model=str(model_dir), dtype="float32"), ModelView(
        bpe_tokenizer(), name="init"
    )


def training_arguments(output_dir: str | os.PathLike, **overrides: Any) -> TrainingArguments:
    """Deterministic CPU arguments: SGD, constant lr, no warmup, sequential data, a log line every step."""
    arguments: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "max_steps": 2,
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
        "remove_unused_columns": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    arguments.update(overrides)
    return TrainingArguments(**arguments)


def make_trainer(
    model: torch.nn.Module,
    dataset: PreferenceDataset,
    args: TrainingArguments,
    *,
    eval_dataset: PreferenceDataset | None = None,
    loss: LossConfig | None = None,
    callbacks: list | None = None,
    padding_free: bool = False,
    micro_batch_tokens: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> MRPOTrainer:
    view = ModelView(bpe_tokenizer(), name="policy")
    collator = PreferenceCollator(
        pad_token_id=view.pad_token_id,
        padding_side=view.padding_side,
        padding_free=padding_free,
        micro_batch_tokens=micro_batch_tokens,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    return MRPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        loss=loss,
        callbacks=callbacks,
    )


def load_policy_model(model_dir: str | os.PathLike) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.train()


class DieAtStep(TrainerCallback):
    """Ends every process abruptly (no cleanup, like kill -9) when step ``step`` is about to begin."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os._exit(137)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("cache_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--world-size", type=int, default=1, help="fail unless this many processes train")
    parser.add_argument(
        "--micro-batch-tokens", type=int, default=None, help="split each batch under this token budget"
    )
    parser.add_argument("--save-steps", type=int, default=None, help="save a checkpoint every N steps")
    parser.add_argument(
        "--die-at-step", type=int, default=None, help="os._exit(137) before step N (a kill -9)"
    )
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint")
    parser.add_argument("--lora", type=int, default=None, help="train LoRA adapters of this rank on q/v")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)

    dataset = build_dataset(
        load_records(standard_records()), [initialising_reference(options.model_dir)], options.cache_dir
    )
    out_dir = Path(options.out_dir)
    saving = {"save_strategy": "steps", "save_steps": options.save_steps} if options.save_steps else {}
    args = training_arguments(
        out_dir / "run",
        per_device_train_batch_size=options.per_device_batch,
        max_steps=options.max_steps,
        **saving,
    )
    if args.world_size != options.world_size:
        raise SystemExit(f"expected {options.world_size} processes, the launcher started {args.world_size}")
    model = load_policy_model(options.model_dir)
    if options.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # the same adapter initialisation in every process and every run
        model = get_peft_model(model, LoraConfig(r=options.lora, lora_alpha=2 * options.lora, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))  # fmt: skip
    trainer = make_trainer(
        model,
        dataset,
        args,
        micro_batch_tokens=options.micro_batch_tokens,
        callbacks=[DieAtStep(options.die_at_step)] if options.die_at_step else None,
    )
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        torch.save(
            {name: p.detach().cpu() for name, p in model.state_dict().items()}, out_dir / "parameters.pt"
        )
        result = {"world_size": trainer.args.world_size, "log_history": trainer.state.log_history}
        (out_dir / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
