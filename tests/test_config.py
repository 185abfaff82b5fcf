"""Tests of the typed config: every shipped YAML loads, overrides and round-trips work, and each mistake gets one
clear message naming the key and the value."""

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from mrpo.config.overrides import parse_override
from mrpo.config.schema import (
    DataConfig,
    LoraConfig,
    LossConfig,
    MRPOConfig,
    PolicyConfig,
    ReferenceConfig,
    load_config,
)
from mrpo.config.training import TrainingConfig
from mrpo.config.typecheck import field_docs
from mrpo.errors import ConfigError

REPOSITORY = Path(__file__).resolve().parents[1]
# Every run config we ship: configs/ and any inside the package (lm-eval task definitions are not run configs).
SHIPPED_CONFIGS = sorted(REPOSITORY.glob("configs/*.yaml")) + sorted(
    path for path in (REPOSITORY / "src" / "mrpo").rglob("*.yaml") if "lm_eval_tasks" not in path.parts
)

MINIMAL = ["policy.model=org/policy", "data.train=data/train.jsonl"]
TWO_REFERENCES = MINIMAL + ["references.1.name=external", "references.1.model=org/external"]


def load(*overrides: str) -> MRPOConfig:
    return load_config(None, [*MINIMAL, *overrides])


def assert_config_error(overrides: list[str], *fragments: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    for fragment in fragments:
        assert fragment in str(caught.value), f"{fragment!r} not in: {caught.value}"
    return caught.value


# --- every shipped config loads, validates and builds its TrainingArguments -----------------------------------


def test_configs_are_shipped():
    assert {path.name for path in SHIPPED_CONFIGS} >= {
        "tiny-cpu.yaml",
        "llama3-8b-two-refs-lora.yaml",
        "distill-small-policy.yaml",
    }


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: str(path.relative_to(REPOSITORY)))
def test_shipped_config_loads_and_builds_training_arguments(path, tmp_path):
    overrides = [f"training.output_dir={tmp_path}"]
    raw_training = (yaml.safe_load(path.read_text()) or {}).get("training") or {}
    if (raw_training.get("bf16") or raw_training.get("fp16")) and not torch.cuda.is_available():
        overrides.append("training.use_cpu=true")  # TrainingArguments refuses bf16 on a machine without a GPU
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # a shipped config must not warn (e.g. a mismatched initialising reference)
        config = load_config(path, overrides)
        arguments = config.training.to_training_arguments()
    assert arguments.output_dir == str(tmp_path)
    assert arguments.remove_unused_columns is False
    assert config.initialising_reference.model == config.policy.model


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.name)
def test_shipped_config_values_survive_resolution(path):
    """Every value written in a shipped YAML is in the resolved config as written (nothing renamed or dropped)."""
    written = yaml.safe_load(path.read_text())
    assert_written_values_kept(written, load_config(path).to_dict(), where=path.name)


def assert_written_values_kept(written, resolved, where: str) -> None:
    if isinstance(written, dict):
        for key, value in written.items():
            assert key in resolved, f"{where}.{key} is missing from the resolved config"
            assert_written_values_kept(value, resolved[key], f"{where}.{key}")
    elif isinstance(written, list):
        assert len(written) == len(resolved), where
        for index, (written_item, resolved_item) in enumerate(zip(written, resolved, strict=True)):
            assert_written_values_kept(written_item, resolved_item, f"{where}.{index}")
    else:
        assert resolved == written, f"{where}: wrote {written!r}, resolved to {resolved!r}"


# --- defaults and the Python API --------------------------------------------------------------------------------


def test_defaults_give_plain_dpo_against_the_policy():
    config = load("policy.dtype=bfloat16", "policy.tokenizer=org/tokenizer")
    assert config.references == [
        ReferenceConfig(name="init", model="org/policy", tokenizer="org/tokenizer", dtype="bfloat16")
    ]
    assert config.loss == LossConfig()
    assert config.loss.beta == 0.1 and config.loss.weights == "adaptive"
    assert config.lora.enabled is False
    assert dict(config.training) == {
        "output_dir": "runs/mrpo",
        "learning_rate": 1e-6,  # TRL's DPO default, not transformers' 5e-5
        "report_to": "none",
        "logging_steps": 10,
        "remove_unused_columns": False,
        "logging_nan_inf_filter": False,  # no second per-step sync: the loss raises on non-finite log-probs
        "seed": 0,
    }
    assert config.cache_dir == ".cache/mrpo"
    assert config.reference_max_length(config.references[0]) == 1024


def test_python_api_builds_the_same_config_as_yaml():
    config = MRPOConfig(
        policy=PolicyConfig(model="org/policy"),
        data=DataConfig(train="data/train.jsonl"),
        loss=LossConfig(beta=1),
        training=TrainingConfig(learning_rate=1e-5),
    )
    assert config == load("loss.beta=1", "training.learning_rate=1e-5")
    assert isinstance(
        config.loss.beta, float
    )  # an int is accepted where a number is expected, stored as float


def test_sections_are_frozen_and_replace_checks_again():
    loss = LossConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss.beta = 0.5  # type: ignore[misc]
    assert dataclasses.replace(loss, beta=0.5).beta == 0.5
    with pytest.raises(ConfigError, match="'loss.beta' must be a number > 0"):
        dataclasses.replace(loss, beta=-1.0)


def test_every_field_has_a_one_line_docstring():
    for section in (PolicyConfig, ReferenceConfig, DataConfig, LossConfig, LoraConfig, MRPOConfig):
        docs = field_docs(section)
        for field in dataclasses.fields(section):
            assert docs.get(field.name), f"{section.__name__}.{field.name} has no docstring"
            assert "\n" not in docs[field.name]


# --- overrides --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss.beta=0.2", ("loss.beta", 0.2)),
        (
            "training.learning_rate=1e-5",
            ("training.learning_rate", 1e-5),
        ),  # YAML 1.1 alone would give a string
        ("data.max_length=512", ("data.max_length", 512)),
        ("lora.enabled=true", ("lora.enabled", True)),
        ("lora.target_modules=[q_proj,v_proj]", ("lora.target_modules", ["q_proj", "v_proj"])),
        ("loss.weights=[1, 0.5]", ("loss.weights", [1, 0.5])),
        ("data.eval=", ("data.eval", None)),
        ("data.eval=null", ("data.eval", None)),
        ("policy.model=org/name=with-equals", ("policy.model", "org/name=with-equals")),
    ],
)
def test_parse_override(override, expected):
    assert parse_override(override) == expected


def test_overrides_of_each_type_reach_the_config():
    config = load_config(
        None,
        [
            *TWO_REFERENCES,
            "loss.beta=0.2",
            "loss.weights=[1, 3]",
            "loss.clip=fixed",
            "data.max_length=512",
            "data.eval=data/test.jsonl",
            "data.max_pairs=100",
            "lora.enabled=true",
            "lora.target_modules=[q_proj,v_proj]",
            "training.learning_rate=1e-5",
            "training.eval_strategy=steps",
            "training.resume_from_checkpoint=true",
            "references.1.max_length=256",
        ],
    )
    assert config.loss.beta == 0.2
    assert config.loss.weights == [1.0, 3.0]
    assert config.loss.clip == "fixed"
    assert (
        config.data.max_length == 512
        and config.data.eval == "data/test.jsonl"
        and config.data.max_pairs == 100
    )
    assert config.lora.enabled is True and config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.training["learning_rate"] == 1e-5
    assert config.training.eval_strategy == "steps"
    assert config.training.resume_from_checkpoint is True
    assert config.references[1].max_length == 256
    assert config.reference_max_length(config.references[1]) == 256
    assert config.reference_max_length(config.references[0]) == 512


def test_override_addresses_a_reference_by_name_and_file_values_lose(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "policy: {model: org/policy}\n"
        "references:\n"
        "  - {name: init, model: org/policy}\n"
        "  - {name: gemma, model: google/gemma-3-270m, max_length: 128}\n"
        "data: {train: data/train.jsonl}\n"
        "loss: {beta: 0.5}\n"
    )
    config = load_config(path, ["references.gemma.max_length=512", "loss.beta=0.3"])
    assert config.references[1].max_length == 512
    assert config.loss.beta == 0.3


def test_override_can_set_the_whole_reference_list():
    config = load("references=[{name: init, model: org/policy}, {name: big, model: org/big}]")
    assert [reference.name for reference in config.references] == ["init", "big"]


def test_resume_from_checkpoint_stays_out_of_training_arguments(tmp_path):
    config = load(f"training.output_dir={tmp_path}", "training.resume_from_checkpoint=runs/x/checkpoint-10")
    assert config.training.resume_from_checkpoint == "runs/x/checkpoint-10"
    assert config.training.to_training_arguments().resume_from_checkpoint is None


# --- round trip -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.name)
def test_save_then_load_gives_an_equal_config(path, tmp_path):
    config = load_config(path, ["loss.beta=0.25", "training.learning_rate=3e-6"])
    config.save(tmp_path / "resolved.yaml")
    reloaded = load_config(tmp_path / "resolved.yaml")
    assert reloaded == config
    assert reloaded.to_dict() == config.to_dict()


def test_from_dict_of_to_dict_is_identity():
    config = load_config(None, [*TWO_REFERENCES, "loss.weights=[1, 2]", "lora.target_modules=[q_proj]"])
    assert MRPOConfig.from_dict(config.to_dict()) == config


# --- each documented mistake: one message naming the key and the value -------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["loss.betta=0.2"], ["unknown key 'loss.betta'", "did you mean 'loss.beta'?"]),
        (["polcy.model=x"], ["unknown key 'polcy'", "did you mean 'policy'?"]),
        (["loss.zzz=1"], ["unknown key 'loss.zzz'", "the keys of 'loss' are: beta, weights"]),
        (["loss.beta=abc"], ["'loss.beta' must be a number", "'abc'"]),
        (["loss.beta=0"], ["'loss.beta' must be a number > 0", "got 0.0"]),
        (["loss.beta=-0.1"], ["'loss.beta'", "-0.1"]),
        (["loss.beta=.inf"], ["'loss.beta'", "inf"]),
        (["loss.eps=-0.5"], ["'loss.eps' must be a number >= 0", "-0.5"]),
        (["data.max_length=1.5"], ["'data.max_length' must be an integer", "1.5"]),
        (["data.max_length=0"], ["'data.max_length' must be at least 1", "got 0"]),
        (["loss.weights=foo"], ["'loss.weights' must be 'adaptive' or a list of numbers", "'foo'"]),
        (["loss.weights=[1, -1]"], ["'loss.weights' must all be finite and >= 0", "[1.0, -1.0]"]),
        (["loss.weights=[0]"], ["'loss.weights' must not all be zero", "[0.0]"]),
        (["loss.weights=[1, 2]"], ["'loss.weights' = [1.0, 2.0] has 2 numbers but there are 1 references"]),
        (
            ["loss.clip=adaptiv"],
            ["'loss.clip' must be one of 'adaptive', 'fixed', 'off'", "did you mean 'adaptive'?"],
        ),
        (["loss.aggregation=mean"], ["'loss.aggregation' must be one of", "'mean'"]),
        (["policy.dtype=bf16"], ["'policy.dtype'", "'bf16'", "did you mean 'bfloat16'?"]),
        (["lora.enabled=yes please"], ["'lora.enabled' must be true or false", "'yes please'"]),
        (["lora.dropout=1"], ["'lora.dropout' must be in [0, 1)", "1.0"]),
        (["lora.target_modules=[]"], ["'lora.target_modules'", "[]"]),
        (
            ["training.learnin_rate=1e-5"],
            ["unknown key 'training.learnin_rate'", "did you mean 'training.learning_rate'?"],
        ),
        (["training.learning_rate=abc"], ["'training.learning_rate' must be a number", "'abc'"]),
        (["policy.micro_batch_tokens=0"], ["'policy.micro_batch_tokens' must be at least 1", "0"]),
        (
            ["policy.micro_batch_tokens=1000", "policy.pad_to_multiple_of=4096"],
            ["'policy.micro_batch_tokens' is below policy.pad_to_multiple_of (4096)", "1000"],
        ),
        (["training.remove_unused_columns=true"], ["'training.remove_unused_columns' must stay false"]),
        (
            ["training.eval_strategy=steps"],
            ["'training.eval_strategy' = 'steps' needs held-out pairs", "data.eval"],
        ),
        (["references.0.name=a/b"], ["'references.0.name' must be 1-64 letters", "'a/b'"]),
        (
            ["references.1.name=init", "references.1.model=x"],
            ["'references.1.name' = 'init' is already the name of references.0"],
        ),
        (["references.1.model=x"], ["missing key 'references.1.name'"]),
        (["references=[]"], ["'references' must list at least one reference"]),
        (["references.init.dtype=fp32"], ["'references.0.dtype'", "'fp32'"]),
        (["references.ini.dtype=float32"], ["'references.ini': no item named 'ini'", "did you mean 'init'?"]),
        (["references.5.name=x"], ["'references.5'", "out of range"]),
        (["cache_dir="], ["'cache_dir' must be a string", "None"]),
        (["loss=0.1"], ["'loss' must be a mapping", "0.1"]),
        (["loss.beta=0.2", "loss.beta.value=1"], ["'loss.beta' is 0.2, not a section with keys"]),
    ],
)
def test_mistakes_name_the_key_and_the_value(overrides, fragments):
    assert_config_error([*MINIMAL, *overrides], *fragments)


def test_an_override_error_quotes_the_override():
    assert_config_error([*MINIMAL, "loss.beta=abc"], "(from the override 'loss.beta=abc')")
    assert_config_error(
        [*TWO_REFERENCES, "references.external.dtype=bf16"],
        "'references.1.dtype'",
        "(from the override 'references.external.dtype=bf16')",
    )


def test_missing_sections_and_keys_are_named():
    assert_config_error([], "missing section 'policy'", "policy.model")
    assert_config_error(["policy.model=org/policy"], "missing section 'data'", "data.train")
    assert_config_error(["policy.tokenizer=x", "data.train=t"], "missing key 'policy.model'", "Hub id")


def test_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override("loss.beta")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("loss.weights=[1, 2")


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("policy: {model: org/policy}\ndata: {train: t}\nloss: {beta: -1}\n")
    assert_config_error_from_file(path, [str(path), "'loss.beta'", "-1"])
    path.write_text("policy: {model: org/policy}\ndata: {train: t}\nloss:\n  beta: 0.1\n  beta: 0.2\n")
    assert_config_error_from_file(path, [str(path), "'beta' appears twice"])
    path.write_text("policy: [\n")
    assert_config_error_from_file(path, [str(path), "not valid YAML"])
    path.write_text("- a list\n")
    assert_config_error_from_file(path, [str(path), "must be a mapping of sections"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def assert_config_error_from_file(path: Path, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    for fragment in fragments:
        assert fragment in str(caught.value), f"{fragment!r} not in: {caught.value}"


def test_yaml_reads_exponents_as_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("policy: {model: m}\ndata: {train: t}\ntraining: {learning_rate: 5e-6}\n")
    assert load_config(path).training["learning_rate"] == 5e-6


def test_mismatched_initialising_reference_warns_but_loads():
    with pytest.warns(UserWarning, match="references.0 .* should be the policy's starting model"):
        config = load("references=[{name: base, model: /local/copy/of/policy}]")
    assert config.initialising_reference.model == "/local/copy/of/policy"


def test_training_arguments_rejections_become_config_errors(tmp_path):
    training = TrainingConfig(output_dir=str(tmp_path), lr_scheduler_type="cosinee")
    with pytest.raises(ConfigError, match="TrainingArguments rejected the 'training' section: cosinee"):
        training.to_training_arguments()
    # A key unknown to the installed transformers (checked on construction; this path guards version drift).
    training = TrainingConfig(output_dir=str(tmp_path))
    training._arguments["learning_rat"] = 1.0
    with pytest.raises(
        ConfigError, match="unknown key 'training.learning_rat' — did you mean 'training.learning_rate'"
    ):
        training.to_training_arguments()


def test_python_api_rejects_a_plain_mapping_where_a_section_belongs():
    with pytest.raises(ConfigError, match=r"'policy' must be a PolicyConfig, got \{'model': 'org/policy'\}"):
        MRPOConfig(policy={"model": "org/policy"}, data=DataConfig(train="t"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'references' must be a list of ReferenceConfigs or null"):
        MRPOConfig(
            policy=PolicyConfig("m"), data=DataConfig("t"), references=[{"name": "init", "model": "m"}]
        )


@pytest.mark.parametrize(
    ("text", "value"), [("no", "no"), ("off", "off"), ("yes", "yes"), ("true", True), ("False", False)]
)
def test_only_true_and_false_are_booleans(text, value):
    from mrpo.config.overrides import parse_override

    assert parse_override(f"training.eval_strategy={text}") == ("training.eval_strategy", value)


def test_eval_strategy_no_from_an_override_is_the_string_no():
    config = load_config(None, [*MINIMAL, "training.eval_strategy=no"])
    assert config.training.eval_strategy == "no"


def test_the_default_learning_rate_follows_lora_and_a_set_one_wins(tmp_path):
    lora = "lora.enabled=true"
    assert load().training["learning_rate"] == 1e-6  # full fine-tuning: TRL's DPO default
    assert load(lora).training["learning_rate"] == 5e-4  # adapters start at zero: 1e-6 barely moves them
    assert load(lora, "training.learning_rate=1e-6").training["learning_rate"] == 1e-6
    assert load("training.learning_rate=3e-5").training["learning_rate"] == 3e-5
    # The default is the section's, not a value it was given: switching LoRA on or off moves it along.
    full = load()
    assert dataclasses.replace(full, lora=LoraConfig(enabled=True)).training["learning_rate"] == 5e-4
    assert dataclasses.replace(load(lora), lora=LoraConfig()).training["learning_rate"] == 1e-6
    # What is saved is the effective value, and it reads back as given.
    load(lora).save(tmp_path / "saved.yaml")
    saved = load_config(tmp_path / "saved.yaml")
    assert saved.training["learning_rate"] == 5e-4
    assert dataclasses.replace(saved, lora=LoraConfig()).training["learning_rate"] == 5e-4
    assert load(lora).with_absolute_paths().training.to_training_arguments().learning_rate == 5e-4
