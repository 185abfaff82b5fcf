"""Tests of the tokenized-split cache (mrpo.tokenized_cache, through pipeline.tokenize_split): found again on the
same data and settings, rebuilt when either changes, never half-written, and the same pairs as in memory."""

import json
import logging
import os
import warnings
from pathlib import Path

import pytest

import mrpo.pipeline as pipeline
from mrpo.config import load_config
from mrpo.errors import DataError
from mrpo.pipeline import load_views, tokenize_split
from mrpo.token_store import StoredPairs, TokenizedPairs


def write_config(root, setup, train, **data):
    options = ", ".join(
        f"{key}: {json.dumps(value)}"
        for key, value in {"train": str(train), "max_length": 256, **data}.items()
    )
    path = root / "config.yaml"
    path.write_text(
        f"policy: {{model: {setup['llama']}, dtype: float32}}\n"
        "references:\n"
        f"  - {{name: init, model: {setup['llama']}, dtype: float32}}\n"
        f"  - {{name: gemma, model: {setup['gemma']}, dtype: float32}}\n"
        f"data: {{{options}}}\n"
        f"cache_dir: {root / 'cache'}\n"
    )
    return load_config(path)


def entries(config):
    return sorted(p.name for p in Path(config.cache_dir).glob("*tokenized-*"))


@pytest.fixture
def data_file(tmp_path, run_setup):
    train = tmp_path / "train.jsonl"
    train.write_bytes(run_setup["train"].read_bytes())
    return train


def tokenize(config):
    return tokenize_split(config, "train", load_views(config))


def test_a_second_run_finds_the_pairs_the_first_stored_without_reading_the_data(
    tmp_path, run_setup, data_file, monkeypatch
):
    config = write_config(tmp_path, run_setup, data_file)
    first = tokenize(config)
    assert first.pairs is None  # streamed: the text was never held
    assert all(isinstance(view, StoredPairs) for view in first.tokenization.per_view)
    assert first.tokenization.per_view[0] is first.tokenization.per_view[1]  # policy and init: one tokenizer
    assert len(entries(config)) == 1

    def no_read(*args, **kwargs):
        raise AssertionError("the data was read again")

    monkeypatch.setattr(pipeline, "stream_split", no_read)
    second = tokenize(config)
    assert list(second.tokenization.pair_ids) == list(first.tokenization.pair_ids)
    for a, b in zip(second.tokenization.per_view, first.tokenization.per_view, strict=True):
        assert a == b
    assert second.counts == first.counts

    # The same pairs, ids and account as reading and tokenizing in memory.
    monkeypatch.undo()
    memory = tokenize(write_config(tmp_path, run_setup, data_file, cache_tokenized=False))
    assert memory.pairs is not None and isinstance(memory.tokenization.per_view[0], TokenizedPairs)
    assert list(memory.tokenization.pair_ids) == list(first.tokenization.pair_ids)
    for a, b in zip(memory.tokenization.per_view, first.tokenization.per_view, strict=True):
        assert a == b
    assert memory.counts == first.counts and memory.counts.summary() == first.counts.summary()
    assert memory.tokenization.summary() == first.tokenization.summary()


def test_a_changed_file_or_setting_is_tokenized_again(tmp_path, run_setup, data_file):
    config = write_config(tmp_path, run_setup, data_file)
    before = tokenize(config)
    rows = data_file.read_text().splitlines()
    data_file.write_text("\n".join(rows[:-1]) + "\n")  # one row fewer
    after = tokenize(config)
    assert len(after.tokenization.pair_ids) == len(before.tokenization.pair_ids) - 1
    shorter = tokenize(write_config(tmp_path, run_setup, data_file, max_length=40))
    assert len(entries(config)) == 3  # the first entry, the shorter file's, and the lower limit's
    assert shorter.tokenization.summary() != after.tokenization.summary()


def test_a_subsample_stays_in_memory_and_stores_nothing(tmp_path, run_setup, data_file):
    config = write_config(tmp_path, run_setup, data_file, max_pairs=2)
    split = tokenize(config)
    assert split.pairs is not None and len(split.tokenization.pair_ids) == 2
    assert entries(config) == []


def test_the_account_of_drops_identical_and_duplicate_rows_matches_the_in_memory_read(
    tmp_path, run_setup, data_file
):
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    identical = {**rows[0], "rejected": rows[0]["chosen"]}
    data_file.write_text(
        "".join(json.dumps(r) + "\n" for r in [*rows, rows[1], identical])
        + '{"prompt": 3}\n'  # a row error, dropped and counted
        + "not json\n"
    )
    streamed_config = write_config(tmp_path, run_setup, data_file, on_error="drop")
    with pytest.warns(UserWarning, match="1 rows have chosen == rejected"):
        streamed = tokenize(streamed_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory = tokenize(
            write_config(tmp_path, run_setup, data_file, on_error="drop", cache_tokenized=False)
        )
    assert streamed.counts == memory.counts
    assert streamed.counts.duplicates == 1 and streamed.counts.identical == 1
    assert sum(streamed.counts.dropped.values()) == 2
    assert streamed.counts.summary() == memory.pairs.summary()


def test_a_bad_row_stops_the_read_and_leaves_no_entry(tmp_path, run_setup, data_file):
    with data_file.open("a") as handle:
        handle.write('{"prompt": "p", "chosen": 1, "rejected": "r"}\n')
    config = write_config(tmp_path, run_setup, data_file)
    lines = len(data_file.read_text().splitlines())
    with pytest.raises(DataError, match=rf"train.jsonl, line {lines}, field 'prompt': this row is standard"):
        tokenize(config)
    cache = tmp_path / "cache"
    assert not list(cache.glob("*tokenized-*")), "a failed build must leave nothing behind"


def test_an_entry_with_a_file_missing_is_rebuilt(tmp_path, run_setup, data_file, caplog):
    config = write_config(tmp_path, run_setup, data_file)
    expected = list(tokenize(config).tokenization.per_view[2])
    (entry,) = (tmp_path / "cache").glob("tokenized-*")
    os.remove(entry / "view-2" / "ends.i64")
    with caplog.at_level(logging.WARNING, logger="mrpo.tokenized_cache"):
        again = tokenize(config)
    assert "does not open" in caplog.text
    assert list(again.tokenization.per_view[2]) == expected
