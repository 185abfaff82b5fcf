"""The distillation recipe at tiny scale: configs/distill-teacher.yaml builds a merged teacher with `mrpo train`,
the teacher knows its pairs better than the student's start does, and configs/distill-student.yaml trains a student
against the start and that teacher."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mrpo.cli import main
from mrpo.config.schema import ReferenceConfig, load_config
from mrpo.prepared_split import prepare_split

REPOSITORY = Path(__file__).resolve().parents[1]


def _tiny(run_setup, tmp_path: Path) -> list[str]:
    return [
        f"training.output_dir={tmp_path / 'teacher'}",
        f"cache_dir={tmp_path / 'cache'}",
        "training.use_cpu=true",
        "training.disable_tqdm=true",
        "training.logging_steps=1",
    ]


@pytest.fixture(scope="module")
def teacher(run_setup, tmp_path_factory) -> Path:
    """Step 1 on the tiny Gemma-family model: DPO with LoRA, merged (built once for the module)."""
    tmp_path = tmp_path_factory.mktemp("distill")
    overrides = [
        f"policy.model={run_setup['gemma']}",
        f"data.train={run_setup['train']}",
        "training.max_steps=8",
        "training.learning_rate=0.05",
        *_tiny(run_setup, tmp_path),
    ]
    assert main(["train", str(REPOSITORY / "configs" / "distill-teacher.yaml"), *overrides]) == 0
    return tmp_path / "teacher" / "merged"


def test_the_teacher_is_a_merged_model_that_knows_its_pairs_better_than_its_start(
    run_setup, teacher, tmp_path
):
    assert (teacher / "config.json").is_file() and not (teacher / "adapter_config.json").exists()
    config = load_config(
        REPOSITORY / "configs" / "distill-teacher.yaml",
        [
            f"policy.model={run_setup['gemma']}",
            f"data.train={run_setup['train']}",
            *_tiny(run_setup, tmp_path),
        ],
    )
    references = [
        ReferenceConfig(name="start", model=str(run_setup["gemma"]), dtype="float32"),
        ReferenceConfig(name="teacher", model=str(teacher), dtype="float32"),
    ]
    config = dataclasses.replace(config, references=references)
    prepared = prepare_split(config, "train", show_progress=False)
    margins = prepared.dataset.reference_chosen_logps - prepared.dataset.reference_rejected_logps
    # The teacher was trained on these pairs: its margin (chosen - rejected) is above its start's on each of them.
    assert bool((margins[1] > margins[0]).all()), margins


def test_the_student_trains_against_its_start_and_the_teacher(run_setup, teacher, tmp_path):
    run_dir = tmp_path / "student"
    overrides = [
        f"policy.model={run_setup['llama']}",
        f"references.init.model={run_setup['llama']}",
        f"references.teacher.model={teacher}",
        f"data.train={run_setup['train']}",
        f"data.eval={run_setup['train']}",
        "training.max_steps=2",
        f"training.output_dir={run_dir}",
        f"cache_dir={tmp_path / 'cache'}",
        "training.use_cpu=true",
        "training.disable_tqdm=true",
    ]
    assert main(["train", str(REPOSITORY / "configs" / "distill-student.yaml"), *overrides]) == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("alpha/ref2" in line for line in metrics)
    saved = load_config(run_dir / "mrpo_config.yaml")
    assert [r.name for r in saved.references] == ["init", "teacher"]
    assert saved.loss.clip == "off"  # the study's setting: CTRO would clip a DPO-trained teacher away
    assert all(
        float(line.get("ctro/clip_rate", 0.0)) == 0.0 for line in metrics
    )  # the teacher reaches the loss
    assert saved.references[1].model == str(teacher)
