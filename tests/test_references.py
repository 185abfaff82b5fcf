"""Tests of mrpo.references: the K-reference cache against the naive computation, resume, keys, corruption."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mrpo import references, weights
from mrpo.config.schema import ReferenceConfig
from mrpo.data.sources import pairs_from_records
from mrpo.data.tokenization import ModelView, tokenize_for_models
from mrpo.errors import CacheError
from mrpo.models import load_tokenizer
from mrpo.reference_store import ReferenceStore
from mrpo.references import precompute
from tiny_models import (
    CHATML_TEMPLATE,
    GEMMA_LIKE_TEMPLATE,
    bpe_tokenizer,
    char_tokenizer,
    save_model_dir,
    tiny_gemma3,
    tiny_llama,
)

# Float32 sums of ~100 log-probs: 1e-5 nats, or one float32 rounding of the sum.
ATOL, RTOL = 1e-5, 1e-6

QUESTIONS = [
    ("Capital of Spain?", "Madrid.", "Paris, I think."),
    ("What is 2 + 2?", "4", "5"),
    ("Colour of the sky?", "Blue.", "Green, mostly."),
    ("Boiling point of water?", "100 degrees Celsius at sea level.", "50 degrees."),
    ("Name an animal.", "A cat.", "A rose."),
    ("What is 3 + 3?", "6", "9"),
    ("Capital of Italy?", "Rome.", "Milan."),
    ("Say hello.", "Hello there!", "Goodbye."),
    ("What is 10 - 3?", "7", "13"),
    ("Capital of France?", "Paris.", "Lyon, the capital."),
    ("What jumps over the dog?", "The quick brown fox.", "A cat."),
]


def conversational_records(n: int = len(QUESTIONS), *, system: bool = True) -> list[dict]:
    records = []
    for i, (question, good, bad) in enumerate(QUESTIONS[:n]):
        prompt = [{"role": "user", "content": question}]
        if system and i % 2 == 0:
            prompt.insert(0, {"role": "system", "content": "Be brief."})
        records.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
    return records


def pair_set(records=None):
    return pairs_from_records(records if records is not None else conversational_records())


# ---------------------------------------------------------------------------------------------------------------
# Model directories (written once per module)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    gemma_chat = copy.deepcopy(char_tokenizer())
    gemma_chat.chat_template = GEMMA_LIKE_TEMPLATE
    bigger_vocab = copy.deepcopy(bpe_tokenizer())
    bigger_vocab.add_tokens(["<zebra>"])  # a vocabulary change that leaves the test texts' ids alone
    other_template = copy.deepcopy(bpe_tokenizer())
    other_template.chat_template = "{{ '### chat\n' }}" + CHATML_TEMPLATE
    return {
        "llama": save_model_dir(tiny_llama(), bpe_tokenizer(), root / "llama"),
        "llama-other-weights": save_model_dir(tiny_llama(seed=1), bpe_tokenizer(), root / "llama-seed1"),
        "gemma": save_model_dir(tiny_gemma3(), char_tokenizer(), root / "gemma"),
        "gemma-chat": save_model_dir(tiny_gemma3(), gemma_chat, root / "gemma-chat"),
        # tokenizer-only directories, used through ReferenceConfig.tokenizer
        "bpe-bigger-vocab": _save_tokenizer(bigger_vocab, root / "bpe-bigger-vocab"),
        "bpe-other-template": _save_tokenizer(other_template, root / "bpe-other-template"),
    }


def _save_tokenizer(tokenizer, directory: Path) -> Path:
    tokenizer.save_pretrained(directory)
    return directory


class ForwardCounter:
    """Wraps the precompute's two scoring paths (padded and prefix-shared rows): counts calls and scored sequences."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.sequences = 0
        self._lock = threading.Lock()
        original = references.sequence_logps

        def counted(model, input_ids, *args, **kwargs):
            with self._lock:
                self.calls += 1
                self.sequences += input_ids.shape[0]
            return original(model, input_ids, *args, **kwargs)

        monkeypatch.setattr(references, "sequence_logps", counted)
        shared = references.prefix_shared_sequence_logps

        def counted_shared(model, input_ids, *args, num_sequences, **kwargs):  # one row holds a pair's two
            with self._lock:
                self.calls += 1
                self.sequences += num_sequences
            return shared(model, input_ids, *args, num_sequences=num_sequences, **kwargs)

        monkeypatch.setattr(references, "prefix_shared_sequence_logps", counted_shared)

    def reset(self) -> None:
        self.calls = self.sequences = 0


@pytest.fixture
def forwards(monkeypatch) -> ForwardCounter:
    return ForwardCounter(monkeypatch)


def run_precompute(pairs, specs, cache_dir, *, overflow="drop", max_length=None):
    """Tokenize ``pairs`` for every spec jointly (as the pipeline does) and precompute; returns (cache, result)."""
    views = [ModelView(load_tokenizer(spec.model, spec.tokenizer), name=spec.name) for spec in specs]
    limits = max_length if max_length is not None else [spec.max_length for spec in specs]
    result = tokenize_for_models(pairs, views, max_length=limits, overflow=overflow)
    cache = precompute(
        specs, views, result.per_view, cache_dir, overflow=overflow, device="cpu", show_progress=False
    )
    return cache, result


def naive_logps(model, tokenized_pairs) -> torch.Tensor:
    """(N, 2): one sequence at a time, no padding, full fp32 log-softmax of the model's own logits."""
    rows = []
    with torch.no_grad():
        for pair in tokenized_pairs:
            row = []
            for sequence in (pair.chosen, pair.rejected):
                ids = torch.tensor([sequence.input_ids])
                logps = model(ids).logits.float().log_softmax(-1)[0]
                positions = torch.arange(sequence.prompt_length - 1, len(sequence.input_ids) - 1)
                row.append(logps[positions, ids[0, sequence.prompt_length :]].sum())
            rows.append(torch.stack(row))
    return torch.stack(rows)


def spec(name, directory, **kwargs) -> ReferenceConfig:
    return ReferenceConfig(name=name, model=str(directory), dtype=kwargs.pop("dtype", "float32"), **kwargs)


def values(cache, pair_ids) -> torch.Tensor:
    columns = cache.columns(pair_ids)
    return torch.stack([columns["reference_chosen_logps"], columns["reference_rejected_logps"]])


def shards(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*/shard-*.pt"))


# ---------------------------------------------------------------------------------------------------------------
# 1. Cached values equal the naive computation, per reference tokenizer


def test_prepare_split_matches_naive_logps_per_tokenizer(tmp_path, model_dirs):
    from mrpo.config.schema import load_config
    from mrpo.data.sources import load_pairs
    from mrpo.prepared_split import prepare_split

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in conversational_records()))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"policy: {{model: {model_dirs['llama']}, dtype: float32}}\n"
        "references:\n"
        f"  - {{name: init, model: {model_dirs['llama']}, dtype: float32, batch_tokens: 64}}\n"
        f"  - {{name: gemma, model: {model_dirs['gemma']}, dtype: float32, batch_tokens: 200}}\n"
        f"data: {{train: {data}, max_length: 256}}\n"
        f"cache_dir: {tmp_path / 'cache'}\n"
    )
    config = load_config(config_file)
    split = prepare_split(config, "train", show_progress=False)
    pair_ids = split.tokenization.pair_ids
    assert len(pair_ids) == len(load_pairs(data)) == len(QUESTIONS)

    # Each reference read the same text with its own tokenizer: different token ids.
    llama_pairs, gemma_pairs = split.tokenization.per_view[1:]
    assert llama_pairs[0].chosen.input_ids != gemma_pairs[0].chosen.input_ids
    cached = values(split.cache, pair_ids)
    for k, (directory, tokenized) in enumerate(
        ((model_dirs["llama"], llama_pairs), (model_dirs["gemma"], gemma_pairs))
    ):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        expected = naive_logps(model, tokenized).T  # (2, N)
        torch.testing.assert_close(cached[:, k], expected, atol=ATOL, rtol=RTOL)
        token_counts = split.cache.columns(pair_ids)["reference_chosen_tokens"][k]
        assert token_counts.tolist() == [pair.chosen.completion_length for pair in tokenized]
    # The two references disagree: a bug serving one reference's numbers for the other would show.
    assert not torch.allclose(cached[:, 0], cached[:, 1])
    # The training dataset carries the same columns.
    assert torch.equal(split.dataset.reference_chosen_logps, cached[0])
    assert torch.equal(split.dataset.reference_rejected_logps, cached[1])

    # Columns follow the order of the ids asked for, whatever it is.
    shuffled = list(pair_ids)
    random.Random(0).shuffle(shuffled)
    assert shuffled != pair_ids
    permutation = [pair_ids.index(pair_id) for pair_id in shuffled]
    assert torch.equal(values(split.cache, shuffled), cached[:, :, permutation])
    # Repeated ids are served repeatedly.
    assert torch.equal(values(split.cache, [pair_ids[3]] * 3), cached[:, :, [3, 3, 3]])


def test_gemma_with_chat_template_matches_naive(tmp_path, model_dirs):
    pairs = pair_set()
    specs = [spec("gemma-chat", model_dirs["gemma-chat"], batch_tokens=300)]
    cache, result = run_precompute(pairs, specs, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["gemma-chat"], dtype=torch.float32).eval()
    torch.testing.assert_close(
        values(cache, result.pair_ids)[:, 0], naive_logps(model, result.per_view[0]).T, atol=ATOL, rtol=RTOL
    )


# ---------------------------------------------------------------------------------------------------------------
# 2. Resume after a kill


class Killed(RuntimeError):
    pass


def test_resume_after_kill_reuses_finished_shards(tmp_path, model_dirs, monkeypatch, forwards):
    monkeypatch.setattr(references, "SHARD_PAIRS", 2)
    pairs = pair_set()
    specs = [spec("init", model_dirs["llama"], batch_tokens=64), spec("gemma", model_dirs["gemma"])]
    n = len(QUESTIONS)

    clean, result = run_precompute(pairs, specs, tmp_path / "clean")
    assert forwards.sequences == 2 * 2 * n  # two references, two sequences per pair
    clean_values = values(clean, result.pair_ids)

    original_write = ReferenceStore.write_shard
    written = []

    def write_then_die(self, *args, **kwargs):
        if len(written) == 3:  # the 4th shard of the first reference never lands
            raise Killed("simulated kill")
        written.append(original_write(self, *args, **kwargs))
        return written[-1]

    monkeypatch.setattr(ReferenceStore, "write_shard", write_then_die)
    with pytest.raises(Killed):
        run_precompute(pairs, specs, tmp_path / "resumed")
    monkeypatch.setattr(ReferenceStore, "write_shard", original_write)
    assert len(shards(tmp_path / "resumed")) == 3

    forwards.reset()
    resumed, _ = run_precompute(pairs, specs, tmp_path / "resumed")
    # The first reference recomputes only the pairs of the lost shards; the second reference all of its pairs.
    assert forwards.sequences == 2 * (n - 3 * 2) + 2 * n
    assert resumed.reports[0].reused == 6 and resumed.reports[0].computed == n - 6
    assert torch.equal(values(resumed, result.pair_ids), clean_values)


# ---------------------------------------------------------------------------------------------------------------
# 3. Store keys: what changes the numbers changes the store; what does not, does not


def _store_dir(cache) -> Path:
    return Path(cache.stores[0].directory)


@pytest.fixture
def baseline(tmp_path, model_dirs, forwards):
    """A store for the llama reference on the conversational pairs; returns (run, store dir)."""
    base_spec = spec("ref", model_dirs["llama"], max_length=256)

    def run(reference=base_spec, pairs=None, overflow="drop"):
        forwards.reset()
        cache, result = run_precompute(pairs or pair_set(), [reference], tmp_path, overflow=overflow)
        return cache, result

    cache, _ = run()
    return run, base_spec, _store_dir(cache)


def test_nothing_changed_reuses_everything(baseline, forwards):
    run, base_spec, base_dir = baseline
    cache, _ = run()
    assert _store_dir(cache) == base_dir
    assert forwards.calls == 0
    assert cache.reports[0].computed == 0 and cache.reports[0].reused == len(QUESTIONS)


@pytest.mark.parametrize(
    "change",
    ["weights", "vocabulary", "chat template", "dtype", "overflow"],
)
def test_changes_that_change_numbers_change_the_store(baseline, forwards, model_dirs, change):
    run, base_spec, base_dir = baseline
    overflow = "drop"
    if change == "weights":
        changed = dataclasses.replace(base_spec, model=str(model_dirs["llama-other-weights"]))
    elif change == "vocabulary":
        changed = dataclasses.replace(base_spec, tokenizer=str(model_dirs["bpe-bigger-vocab"]))
    elif change == "chat template":
        changed = dataclasses.replace(base_spec, tokenizer=str(model_dirs["bpe-other-template"]))
    elif change == "dtype":
        changed = dataclasses.replace(base_spec, dtype="bfloat16")
    else:
        changed, overflow = base_spec, "truncate"
    cache, _ = run(changed, overflow=overflow)
    assert _store_dir(cache) != base_dir
    assert forwards.sequences == 2 * len(QUESTIONS)
    assert cache.reports[0].reused == 0


def test_weights_change_is_seen_in_place(baseline, forwards, model_dirs):
    """Overwriting the weights in the same directory (a re-trained checkpoint) must not reuse the old store."""
    run, base_spec, base_dir = baseline
    save_model_dir(tiny_llama(seed=2), bpe_tokenizer(), model_dirs["llama-other-weights"].parent / "in-place")
    in_place = dataclasses.replace(
        base_spec, model=str(model_dirs["llama-other-weights"].parent / "in-place")
    )
    first, _ = run(in_place)
    save_model_dir(tiny_llama(seed=3), bpe_tokenizer(), model_dirs["llama-other-weights"].parent / "in-place")
    second, _ = run(in_place)
    assert _store_dir(first) != _store_dir(second)
    assert forwards.sequences == 2 * len(QUESTIONS)


def test_max_length_is_in_the_key_only_when_truncating(baseline, forwards):
    run, base_spec, base_dir = baseline
    # overflow="drop": a pair is scored whole or not at all, so another limit shares the store (no pair dropped).
    cache, _ = run(dataclasses.replace(base_spec, max_length=512))
    assert _store_dir(cache) == base_dir and forwards.calls == 0
    # A tighter limit that drops pairs still reuses the store for the pairs kept.
    cache, result = run(dataclasses.replace(base_spec, max_length=40))
    assert 0 < len(result.pair_ids) < len(QUESTIONS)
    assert _store_dir(cache) == base_dir and forwards.calls == 0
    # overflow="truncate": the limit changes the numbers, so it changes the store.
    cut_short, result_short = run(dataclasses.replace(base_spec, max_length=40), overflow="truncate")
    assert forwards.sequences == 2 * len(result_short.pair_ids)
    cut_long, _ = run(dataclasses.replace(base_spec, max_length=512), overflow="truncate")
    assert forwards.sequences == 2 * len(QUESTIONS)
    assert len({_store_dir(cut_short), _store_dir(cut_long), base_dir}) == 3
    truncated = [
        p
        for p in result_short.per_view[0]
        if len(p.chosen.input_ids) == 40 or len(p.rejected.input_ids) == 40
    ]
    assert truncated, "the 40-token limit must truncate some pair for this test to mean anything"
    short = values(cut_short, [p.pair_id for p in truncated])
    long = values(cut_long, [p.pair_id for p in truncated])
    assert not torch.equal(short, long)


def test_changed_data_computes_only_the_new_pairs(baseline, forwards):
    run, _, base_dir = baseline
    records = conversational_records()
    records[2]["chosen"][0]["content"] = "Blue, on a clear day."
    records.append(
        {
            "prompt": [{"role": "user", "content": "Capital of Germany?"}],
            "chosen": [{"role": "assistant", "content": "Berlin."}],
            "rejected": [{"role": "assistant", "content": "Bonn."}],
        }
    )
    old_ids = {pair.pair_id for pair in pair_set()}
    new_pairs = pair_set(records)
    cache, result = run(pairs=new_pairs)
    assert _store_dir(cache) == base_dir
    assert len({p.pair_id for p in new_pairs} - old_ids) == 2
    assert forwards.sequences == 2 * 2
    assert cache.reports[0].computed == 2 and cache.reports[0].reused == len(records) - 2
    # A subsample of the original data is served without a forward.
    subset = pair_set(conversational_records(4))
    _, _ = run(pairs=subset)
    assert forwards.calls == 0


# ---------------------------------------------------------------------------------------------------------------
# 4. Corrupt, truncated and foreign shards


def test_corrupt_truncated_and_foreign_shards_are_recomputed(
    tmp_path, model_dirs, monkeypatch, forwards, caplog
):
    monkeypatch.setattr(references, "SHARD_PAIRS", 2)
    pairs = pair_set()
    llama = spec("init", model_dirs["llama"], batch_tokens=64)
    gemma = spec("gemma", model_dirs["gemma"])
    clean, result = run_precompute(pairs, [llama, gemma], tmp_path)
    clean_values = values(clean, result.pair_ids)
    llama_dir, gemma_dir = (Path(store.directory) for store in clean.stores)
    llama_shards = sorted(llama_dir.glob("shard-*.pt"))
    assert len(llama_shards) == 6

    # truncated
    content = llama_shards[0].read_bytes()
    llama_shards[0].write_bytes(content[: len(content) // 2])
    # one flipped byte in the middle
    content = bytearray(llama_shards[1].read_bytes())
    content[len(content) // 2] ^= 0xFF
    llama_shards[1].write_bytes(bytes(content))
    # a foreign shard: valid bytes and checksum, written for the gemma store (same pair ids, other numbers)
    foreign = sorted(gemma_dir.glob("shard-*.pt"))[2]
    llama_shards[2].unlink()
    (llama_dir / foreign.name).write_bytes(foreign.read_bytes())
    # garbage under a name whose checksum matches: passes the checksum, fails to load
    garbage = b"not a torch file"
    (llama_dir / f"shard-1-1-{hashlib.sha256(garbage).hexdigest()[:16]}.pt").write_bytes(garbage)
    # a loadable file of the wrong shape (e.g. an older shard format) under a matching name
    odd = tmp_path / "odd.pt"
    torch.save({"key": clean.stores[0].key.digest, "pair_ids": ["x"]}, odd)
    odd_bytes = odd.read_bytes()
    (llama_dir / f"shard-2-2-{hashlib.sha256(odd_bytes).hexdigest()[:16]}.pt").write_bytes(odd_bytes)

    forwards.reset()
    with caplog.at_level(logging.WARNING, logger="mrpo.references"):
        recomputed, _ = run_precompute(pairs, [llama, gemma], tmp_path)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 5, warnings
    assert sum("checksum" in w for w in warnings) == 2
    assert sum("another model" in w for w in warnings) == 1
    assert recomputed.reports[0].discarded_shards == 5
    assert forwards.sequences == 2 * 3 * 2  # three damaged shards of two pairs, two sequences each
    assert recomputed.reports[0].computed == 6 and recomputed.reports[1].computed == 0
    assert not (llama_dir / foreign.name).exists()
    assert torch.equal(values(recomputed, result.pair_ids), clean_values)
    assert (
        len(list(llama_dir.glob("shard-*.pt"))) == 3 + 3
    )  # 3 intact + 3 recomputed (all pairs in one shard)


# ---------------------------------------------------------------------------------------------------------------
# 5. Asking for pairs the cache does not hold


def test_columns_for_other_data_raise_cache_error(tmp_path, model_dirs):
    specs = [spec("init", model_dirs["llama"]), spec("gemma", model_dirs["gemma"])]
    cache, result = run_precompute(pair_set(conversational_records(3)), specs, tmp_path)
    other = pair_set()[5].pair_id
    with pytest.raises(CacheError, match=r"'init'.*pair id " + other + r".*other data"):
        cache.columns([*result.pair_ids, other])
    # A store that lacks pairs for the second reference only names the second reference.
    cache.stores[1].entries.discard(result.pair_ids[1])
    with pytest.raises(CacheError, match=r"reference 2 \('gemma'.*pair id " + result.pair_ids[1]):
        cache.columns(result.pair_ids)
    assert cache.columns([])["reference_chosen_logps"].shape == (2, 0)


# ---------------------------------------------------------------------------------------------------------------
# 6. Several processes share the work


class FakeState:
    """Stands in for accelerate's PartialState in one thread that plays one rank."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")
        self._barrier = barrier

    def wait_for_everyone(self) -> None:
        self._barrier.wait(timeout=60)


def test_ranks_split_missing_pairs_disjointly(tmp_path, model_dirs, monkeypatch):
    import accelerate

    monkeypatch.setattr(references, "SHARD_PAIRS", 2)
    world = 2
    barrier = threading.Barrier(world)
    local = threading.local()
    monkeypatch.setattr(accelerate, "PartialState", lambda: local.state)
    written: dict[int, list[str]] = {rank: [] for rank in range(world)}
    first_shard_written = threading.Event()
    original_write = ReferenceStore.write_shard

    def recording_write(self, pair_ids, *args, **kwargs):
        written[local.state.process_index].extend(pair_ids)
        path = original_write(self, pair_ids, *args, **kwargs)
        first_shard_written.set()
        return path

    monkeypatch.setattr(ReferenceStore, "write_shard", recording_write)
    # Real ranks are processes; in threads, from_pretrained's global meta-device context must not overlap.
    loading = threading.Lock()
    original_load = references.load_model

    def load_one_at_a_time(*args, **kwargs):
        with loading:
            return original_load(*args, **kwargs)

    monkeypatch.setattr(references, "load_model", load_one_at_a_time)
    pairs = pair_set()
    specs = [spec("init", model_dirs["llama"], batch_tokens=64)]
    caches: dict[int, object] = {}
    errors: list[BaseException] = []

    def play(rank: int) -> None:
        local.state = FakeState(rank, world, barrier)
        try:
            if rank == 1:
                # A slow rank: starts once rank 0 has written a shard (or after a while if rank 0 waits for it).
                first_shard_written.wait(timeout=3)
            caches[rank], _ = run_precompute(pairs, specs, tmp_path)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=play, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    all_ids = {pair.pair_id for pair in pairs}
    assert written[0] and written[1]
    assert not set(written[0]) & set(written[1])
    assert sorted(written[0] + written[1]) == sorted(all_ids)
    ids = [pair.pair_id for pair in pairs]
    assert torch.equal(values(caches[0], ids), values(caches[1], ids))
    # The merged cache equals one process scoring everything (the same shards, so the same batches).
    local.state = FakeState(0, 1, threading.Barrier(1))
    alone, _ = run_precompute(pairs, specs, tmp_path / "one-process")
    assert torch.equal(values(alone, ids), values(caches[0], ids))


# ---------------------------------------------------------------------------------------------------------------
# 7. The command line


def test_cli_precompute_prints_summary_and_second_run_computes_nothing(
    tmp_path, model_dirs, capsys, forwards
):
    from mrpo.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in conversational_records()))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"policy: {{model: {model_dirs['llama']}, dtype: float32}}\n"
        "references:\n"
        f"  - {{name: init, model: {model_dirs['llama']}, dtype: float32}}\n"
        f"  - {{name: gemma, model: {model_dirs['gemma']}, dtype: float32}}\n"
        f"data: {{train: {data}, eval: {data}, max_length: 256}}\n"
        f"training: {{output_dir: {tmp_path / 'run'}}}\n"
        f"cache_dir: {tmp_path / 'cache'}\n"
    )

    def computed_column(output: str) -> dict[str, list[int]]:
        rows: dict[str, list[int]] = {}
        for line in output.splitlines():
            fields = line.split()
            if fields and fields[0] in ("init", "gemma"):
                assert int(fields[1]) == len(QUESTIONS)
                rows.setdefault(fields[0], []).append(int(fields[2]))
        return rows

    assert main(["precompute", str(config)]) == 0
    first = capsys.readouterr().out
    assert "[train]" in first and "[eval]" in first and "agree-with-labels" in first
    # train computes every pair; eval (the same pairs) then finds them all in the cache.
    assert computed_column(first) == {"init": [len(QUESTIONS), 0], "gemma": [len(QUESTIONS), 0]}
    assert forwards.sequences == 2 * 2 * len(QUESTIONS)

    forwards.reset()
    assert main(["precompute", str(config), "data.max_length=300"]) == 0
    assert computed_column(capsys.readouterr().out) == {"init": [0, 0], "gemma": [0, 0]}
    assert forwards.calls == 0


def test_non_finite_cached_log_prob_is_a_cache_error_naming_reference_and_pair(tmp_path):
    from mrpo.reference_store import StoreKey
    from mrpo.references import ReferenceCache

    key = StoreKey("fp", "tok", None, "drop", "torch.float32")
    store = ReferenceStore.open(tmp_path, key)
    store.write_shard(
        ["a", "b"],
        torch.tensor([[-1.0, -2.0], [float("-inf"), -3.0]]),
        torch.tensor([[1, 1], [1, 1]]),
        np.zeros(2, np.uint64),
    )
    cache = ReferenceCache(["ext"], [store])
    with pytest.raises(CacheError, match=r"reference 1 \('ext'\) gives a non-finite log-prob .* pair id b"):
        cache.columns(["a", "b"])
    assert cache.columns(["a"])["reference_chosen_logps"].tolist() == [[-1.0]]


def test_large_weights_are_sampled_with_a_log_line_and_full_hashing_sees_every_byte(
    tmp_path, monkeypatch, caplog
):
    weights_file = tmp_path / "model" / "model.safetensors"
    weights_file.parent.mkdir()
    weights_file.write_bytes(bytes(range(256)) * 16384)  # 4 MiB
    monkeypatch.setattr(weights, "_FULL_HASH_LIMIT", 1 << 20)  # "large" above 1 MiB for the test
    with caplog.at_level(logging.INFO, logger="mrpo.weights"):
        sampled = weights.model_fingerprint(str(weights_file.parent))
    assert "from 64 sampled MiB per weight file" in caplog.text and "hash_weights: full" in caplog.text
    full = weights.model_fingerprint(str(weights_file.parent), "full")
    # The full hash sees an in-place edit anywhere (the sampled one only inside its 64 samples).
    content = bytearray(weights_file.read_bytes())
    content[len(content) // 2] ^= 0xFF
    weights_file.write_bytes(bytes(content))
    assert weights.model_fingerprint(str(weights_file.parent), "full") != full
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mrpo.weights"):
        weights.model_fingerprint(str(weights_file.parent), "full")
    assert "sampled" not in caplog.text
    assert sampled != full  # the two modes never share a store


def test_the_same_model_under_another_name_or_path_reuses_the_store(tmp_path, model_dirs):
    import shutil

    copy_dir = tmp_path / "same-weights-elsewhere"
    shutil.copytree(model_dirs["llama"], copy_dir)
    first, _ = run_precompute(pair_set(), [spec("init", model_dirs["llama"])], tmp_path / "cache")
    assert first.reports[0].computed == len(pair_set())
    again, _ = run_precompute(pair_set(), [spec("teacher", copy_dir)], tmp_path / "cache")
    assert again.reports[0].computed == 0 and again.reports[0].reused == len(pair_set())
    assert again.stores[0].directory == first.stores[0].directory


def test_entries_scored_from_other_tokens_are_scored_again_and_never_served(tmp_path, model_dirs, caplog):
    from mrpo.data.token_store import TokenizedPair, TokenizedPairs, TokenizedSequence

    specs = [spec("init", model_dirs["llama"]), spec("gemma", model_dirs["gemma"])]
    views = [ModelView(load_tokenizer(s.model), name=s.name) for s in specs]
    result = tokenize_for_models(pair_set(), views, max_length=[None, None])
    clean = precompute(specs, views, result.per_view, tmp_path / "clean", device="cpu", show_progress=False)

    # The same pair ids with one completion token changed in pair 1 for gemma (a damaged tokenized entry).
    damaged = list(result.per_view[1])
    ids = list(damaged[1].chosen.input_ids)
    ids[-1] = (ids[-1] + 1) % 50
    damaged[1] = TokenizedPair(
        damaged[1].pair_id,
        TokenizedSequence(tuple(ids), damaged[1].chosen.prompt_length),
        damaged[1].rejected,
    )
    cache_dir = tmp_path / "cache"
    precompute(specs, views, [result.per_view[0], TokenizedPairs(damaged)], cache_dir, device="cpu",
               show_progress=False)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mrpo.references"):
        again = precompute(specs, views, result.per_view, cache_dir, device="cpu", show_progress=False)
    assert [r.computed for r in again.reports] == [0, 1]  # only the pair whose tokens differ
    assert "1 pair(s)" in caplog.text and "scored from other tokens" in caplog.text
    # Rescored alone rather than in its batch: the same numbers up to float rounding (prefix-shared rows on the CPU)
    torch.testing.assert_close(
        values(again, result.pair_ids), values(clean, result.pair_ids), rtol=0, atol=1e-5
    )
    # A reader given the damaged tokens finds no entry for them (the store now holds the clean pair's).
    with pytest.raises(CacheError, match=r"lacks 1 of .* pairs from these tokens .*first: pair id"):
        references.open_cache(specs, views, result.pair_ids, cache_dir, device="cpu",
                              tokenized=[result.per_view[0], damaged])  # fmt: skip


def _precompute_in_process(model: str, cache_dir: str, out: str, barrier) -> None:
    import time as _time

    original = references.score_pairs

    def slow(*args, **kwargs):  # long enough that the two runs overlap
        _time.sleep(1.5)
        return original(*args, **kwargs)

    references.score_pairs = slow
    specs = [spec("init", model)]
    views = [ModelView(load_tokenizer(model), name="init")]
    result = tokenize_for_models(pair_set(), views, max_length=[None])
    barrier.wait()
    cache = precompute(specs, views, result.per_view, cache_dir, device="cpu", show_progress=False)
    Path(out).write_text(json.dumps([cache.reports[0].computed, cache.reports[0].reused]))


def test_two_runs_filling_one_store_at_once_score_each_pair_once(tmp_path, model_dirs):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    outputs = [tmp_path / f"out-{i}.json" for i in range(2)]
    processes = [
        context.Process(
            target=_precompute_in_process,
            args=(str(model_dirs["llama"]), str(tmp_path / "cache"), str(out), barrier),
        )
        for out in outputs
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0
    reports = sorted(json.loads(out.read_text()) for out in outputs)
    n = len(pair_set())
    assert reports == [[0, n], [n, 0]]  # the second waited for the first and reused every pair


def test_a_full_disk_during_a_shard_write_is_one_cache_error_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    from mrpo.reference_store import StoreKey

    store = ReferenceStore.open(tmp_path, StoreKey("fp", "tok", None, "drop", "torch.float32"))

    def full_disk(payload, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(references.torch, "save", full_disk)
    with pytest.raises(CacheError, match=r"cannot write a shard .*No space left on device.*rerun resumes"):
        store.write_shard(["a"], torch.tensor([[-1.0, -2.0]]), torch.tensor([[1, 1]]), np.zeros(1, np.uint64))
    assert not list(store.directory.glob("*.tmp")) and not list(store.directory.glob("shard-*"))


def _read_only_under(monkeypatch, root: Path) -> None:
    """Writes under ``root`` fail as on a read-only mount (root ignores chmod, so the mkdir is refused instead)."""
    import errno
    import os

    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).resolve().is_relative_to(root.resolve()):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


def test_a_read_only_cache_is_one_cache_error_naming_the_store(tmp_path, model_dirs, monkeypatch):
    _read_only_under(monkeypatch, tmp_path / "cache")
    with pytest.raises(CacheError) as caught:
        run_precompute(pair_set().pairs[:2], [spec("init", model_dirs["llama"])], tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith(f"cannot write the reference store {tmp_path / 'cache'}/store-")
    assert "read-only" in message and "point cache_dir at a writable directory" in message
    assert "\n" not in message


def test_token_ids_past_the_embedding_are_refused_before_the_forward_naming_the_model(model_dirs, forwards):
    from mrpo.data.token_store import TokenizedPair, TokenizedPairs, TokenizedSequence
    from mrpo.errors import ModelSourceError

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    rows = model.get_input_embeddings().num_embeddings
    pair = TokenizedPair("p", TokenizedSequence((1, 2, 3), 1), TokenizedSequence((1, 2, rows + 4), 1))
    view = ModelView(bpe_tokenizer(), name="init")
    with pytest.raises(ModelSourceError) as caught:
        references.score_pairs(model, view, TokenizedPairs([pair]), 1000, lambda done: None)
    assert str(caught.value).startswith(
        f"init ({model_dirs['llama']}): token id {rows + 4} is past the {rows} rows"
    )
    assert forwards.calls == 0


# ---------------------------------------------------------------------------------------------------------------
# Host-device syncs: one per shard


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_precompute_syncs_with_the_device_once_per_shard(tmp_path, model_dirs, monkeypatch, forwards, name):
    """Counted on the CPU as they would happen on an accelerator (tests/sync_counter.py): scoring a shard reads
    the device once -- every batch's log-probs, token counts and LM-head checks in one copy -- and uploads
    without waiting. Before: a ``.cpu()`` pair and two ``.item()`` a batch, and five blocking uploads. The model's
    forward is not mrpo's: with sdpa, transformers' mask builder adds a sync or two a batch (it asks whether the
    padding mask is all ones)."""
    from sync_counter import SyncCounter

    counter = SyncCounter()
    per_shard = []
    loaded, scored = references.load_model, references.score_pairs

    def watched(*args, **kwargs):
        model = loaded(*args, **kwargs)
        counter.watch(model)
        return model

    def counted(*args, **kwargs):
        counter.reset()
        with counter:
            result = scored(*args, **kwargs)
        per_shard.append((counter.count, counter.made_by("transformers"), counter.table()))
        return result

    monkeypatch.setattr(references, "load_model", watched)
    monkeypatch.setattr(references, "score_pairs", counted)
    monkeypatch.setattr(references, "SHARD_PAIRS", 4)  # 11 pairs: 3 shards
    reference = spec("init", model_dirs[name], batch_tokens=60)  # a few sequences a batch
    cache, result = run_precompute(pair_set(), [reference], tmp_path)
    assert len(per_shard) == len(shards(tmp_path)) == 3 and forwards.calls > 6
    for count, by_transformers, table in per_shard:
        assert count - by_transformers == 1, table
    model = AutoModelForCausalLM.from_pretrained(model_dirs[name])
    expected = naive_logps(model, result.per_view[0])
    torch.testing.assert_close(values(cache, result.pair_ids)[:, 0].T, expected, atol=ATOL, rtol=RTOL)
