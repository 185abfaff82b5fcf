"""Tests of the tokenized-split cache (mrpo.data.token_cache, through splits.tokenize_split): found again on the
same data and settings, rebuilt when either changes, never half-written, and the same pairs as in memory."""

import json
import logging
import os
import re
import warnings
from pathlib import Path

import pytest

import mrpo.splits as splits
from mrpo.config.schema import load_config
from mrpo.data.token_store import StoredPairs, TokenizedPairs
from mrpo.errors import DataError
from mrpo.splits import load_views, tokenize_split


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

    monkeypatch.setattr(splits, "stream_split", no_read)
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
    # Found in the cache, the split still says so (as a read of the file does on every run).
    with pytest.warns(UserWarning, match=r"1 rows have chosen == rejected \(first: line 6\)"):
        again = tokenize(streamed_config)
    assert again.counts == streamed.counts


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
    with caplog.at_level(logging.WARNING, logger="mrpo.data.token_cache"):
        again = tokenize(config)
    assert "does not open" in caplog.text
    assert list(again.tokenization.per_view[2]) == expected


def _tokenize_in_process(config_path: str, out: str) -> None:
    import json as _json

    from mrpo.config.schema import load_config as _load

    split = tokenize(_load(config_path))
    Path(out).write_text(_json.dumps([list(split.tokenization.pair_ids), split.tokenization.summary()]))


def test_two_processes_building_one_entry_at_once_both_get_it_and_leave_one(tmp_path, run_setup, data_file):
    import multiprocessing

    config = write_config(tmp_path, run_setup, data_file)
    context = multiprocessing.get_context("spawn")
    outputs = [tmp_path / f"out-{i}.json" for i in range(2)]
    processes = [
        context.Process(target=_tokenize_in_process, args=(str(tmp_path / "config.yaml"), str(out)))
        for out in outputs
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    first, second = (json.loads(out.read_text()) for out in outputs)
    assert first == second
    assert entries(config) == [p for p in entries(config) if p.startswith("tokenized-")]  # no temporary left
    assert len(entries(config)) == 1


def test_a_build_that_loses_the_race_uses_the_entry_stored_first(tmp_path, run_setup, data_file, monkeypatch):
    import mrpo.data.token_cache as tokenized_cache

    config = write_config(tmp_path, run_setup, data_file)
    rename = os.rename

    def other_process_first(source, target):
        # Another process finishes the same entry just before this one renames its own.
        monkeypatch.setattr(tokenized_cache.os, "rename", rename)
        other = tokenize(config)
        assert Path(target).is_dir() and len(other.tokenization.pair_ids) > 0
        rename(source, target)  # fails: the target exists and is not empty

    monkeypatch.setattr(tokenized_cache.os, "rename", other_process_first)
    split = tokenize(config)
    assert len(entries(config)) == 1 and not list((tmp_path / "cache").glob(".tokenized-*"))
    assert list(split.tokenization.pair_ids) == list(tokenize(config).tokenization.pair_ids)


HOLD_A_BUILD = """
import fcntl, os, sys, time
path = sys.argv[1]
os.makedirs(path)
lock = os.open(os.path.join(path, ".build.lock"), os.O_CREAT | os.O_RDWR)
fcntl.flock(lock, fcntl.LOCK_EX)
print("holding", flush=True)
time.sleep(600)
"""


def test_a_build_is_removed_only_when_its_lock_is_free_whatever_its_host_and_pid(
    tmp_path, run_setup, data_file
):
    import subprocess
    import sys
    import time

    from mrpo.data.token_cache import _HOST, start_build

    config = write_config(tmp_path, run_setup, data_file)
    cache = tmp_path / "cache"
    cache.mkdir()
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout)  # fmt: skip
    # Killed: its process ended, so its lock is free.
    killed = subprocess.run(
        [sys.executable, "-c", "from pathlib import Path; import sys; from mrpo.data.token_cache import start_build; "
         "print(start_build(Path(sys.argv[1]), 'tokenized-' + '0' * 32)[0])", str(cache)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # Live in another container: the same host name, a pid that is dead in this pid space, its lock held.
    other = cache / f".tokenized-{'1' * 32}-{_HOST}-{dead_pid}-abc123"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_BUILD, str(other)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        mine, lock = start_build(cache, "tokenized-" + "2" * 32)  # live in this process
        old = cache / f".tokenized-{'3' * 32}-{_HOST}-1-abc123"  # an older layout's leftover: no lock file
        old.mkdir()
        os.utime(old, (time.time() - 3600,) * 2)
        tokenize(config)
        assert not Path(killed).exists() and not old.exists()
        assert other.exists() and mine.exists()  # live builds are left alone
        os.close(lock)
    finally:
        holder.kill()
        holder.wait()
    tokenize(write_config(tmp_path, run_setup, data_file, max_length=40))  # another entry: sweeps again
    assert not other.exists() and not mine.exists()


def _flip(path: Path, at: int, mask: int = 0xFF) -> None:
    content = bytearray(path.read_bytes())
    content[at] ^= mask
    path.write_bytes(bytes(content))


@pytest.mark.parametrize(
    ("name", "where", "mask"),
    [
        ("ids.i32", lambda size: size // 2, 0xFF),  # a byte of a token id, same size
        ("prompts.i32", lambda size: 4, 0x01),  # one prompt length off by one
        ("ends.i64", lambda size: 8, 0x01),  # the lowest bit of an offset: a token moves between sequences
        ("hashes.u64", lambda size: 0, 0x01),
        ("pair_ids.txt", lambda size: 0, 0x01),
    ],
)
def test_a_damaged_file_of_the_same_size_is_detected_at_open_and_rebuilt(
    tmp_path, run_setup, data_file, caplog, name, where, mask
):
    config = write_config(tmp_path, run_setup, data_file)
    clean = tokenize(config)
    expected = [list(view) for view in clean.tokenization.per_view]
    (entry,) = (tmp_path / "cache").glob("tokenized-*")
    path = entry / "view-2" / name
    _flip(path, where(path.stat().st_size), mask)
    with caplog.at_level(logging.WARNING, logger="mrpo.data.token_cache"):
        again = tokenize(config)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(entry) in line and f"view-2/{name} does not match the checksum" in line
    assert [list(view) for view in again.tokenization.per_view] == expected


def test_damage_the_open_samples_miss_is_caught_when_the_sequence_is_read(
    tmp_path, run_setup, data_file, monkeypatch
):
    import mrpo.data.token_cache as tokenized_cache
    from mrpo.errors import CacheError

    monkeypatch.setattr(tokenized_cache, "SAMPLE_BYTES", 4)  # ids.i32 "large": 4-byte samples
    monkeypatch.setattr(tokenized_cache, "SAMPLES", 1)
    config = write_config(tmp_path, run_setup, data_file)
    tokenize(config)
    (entry,) = (tmp_path / "cache").glob("tokenized-*")
    ids = entry / "view-2" / "ids.i32"
    _flip(ids, ids.stat().st_size // 3)  # between the samples
    split = tokenize(config)  # opens: the samples match
    with pytest.raises(
        CacheError, match=rf"does not match the checksum .* delete {entry} and run the command"
    ):
        list(split.tokenization.per_view[2])


def test_an_entry_without_its_account_is_removed_and_rebuilt_once(tmp_path, run_setup, data_file, caplog):
    config = write_config(tmp_path, run_setup, data_file)
    expected = list(tokenize(config).tokenization.pair_ids)
    (entry,) = (tmp_path / "cache").glob("tokenized-*")
    (entry / "split.json").unlink()
    with caplog.at_level(logging.WARNING, logger="mrpo.data.token_cache"):
        assert list(tokenize(config).tokenization.pair_ids) == expected
    assert f"{entry} is incomplete (it has no split.json)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mrpo.data.token_cache"):
        again = tokenize(config)  # found: not tokenized a second time
    assert list(again.tokenization.pair_ids) == expected and "Tokenizing again" not in caplog.text
    assert entries(config) == [entry.name]


def _edit_keeping_size_and_time(path: Path, at: int) -> None:
    status = path.stat()
    content = bytearray(path.read_bytes())
    content[at] = ord("X") if content[at] != ord("X") else ord("Y")
    path.write_bytes(bytes(content))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


def _text_offset(path: Path, fraction: float) -> int:
    """An offset near ``fraction`` of the file inside a JSON string value (an edit there keeps the row valid)."""
    content = path.read_bytes()
    at = content.index(b'"content": "', int(len(content) * fraction)) + len(b'"content": "')
    return at


def test_a_data_file_edited_in_place_keeping_size_and_time_is_tokenized_again(
    tmp_path, run_setup, data_file, caplog
):
    config = write_config(tmp_path, run_setup, data_file)
    before = list(tokenize(config).tokenization.pair_ids)
    with caplog.at_level(logging.WARNING, logger="mrpo.data.token_cache"):
        tokenize(config)
    (hit,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert hit.startswith("Tokens found in the cache:") and "a checksum of every byte" in hit
    _edit_keeping_size_and_time(data_file, _text_offset(data_file, 0.5))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mrpo.data.token_cache"):
        after = list(tokenize(config).tokenization.pair_ids)
    assert "changed since it was tokenized (same size and modification time, other bytes)" in caplog.text
    assert after != before and len(after) == len(before)


@pytest.mark.parametrize(("fraction", "seen"), [(0.0, True), (0.999, True), (0.4, False)])
def test_a_large_data_file_is_checked_by_its_ends_and_samples_and_the_hit_says_so(
    tmp_path, run_setup, data_file, caplog, monkeypatch, fraction, seen
):
    import mrpo.data.token_cache as tokenized_cache

    size = data_file.stat().st_size
    monkeypatch.setattr(tokenized_cache, "SAMPLE_BYTES", size // 8)  # "first and last MiB": an eighth each
    monkeypatch.setattr(tokenized_cache, "SAMPLES", 1)  # one sample in the middle
    config = write_config(tmp_path, run_setup, data_file)
    before = list(tokenize(config).tokenization.pair_ids)
    content = data_file.read_bytes()
    if fraction == 0.0:
        at = _text_offset(data_file, 0.0)
    elif fraction > 0.9:
        at = content.rindex(b'"content": "') + len(b'"content": "')
    else:
        at = _text_offset(data_file, fraction)
    assert (
        at < size // 8 or at >= size - size // 8
    ) == seen  # the edit is inside the ends or between samples
    _edit_keeping_size_and_time(data_file, at)
    with caplog.at_level(logging.WARNING, logger="mrpo.data.token_cache"):
        after = list(tokenize(config).tokenization.pair_ids)
    if seen:
        assert "changed since it was tokenized" in caplog.text and after != before
    else:  # the limit, stated in the visible line
        (hit,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "first and last MiB and 1 sampled MiB (an edit elsewhere" in hit
        assert "data.cache_tokenized=false reads the data again" in hit and after == before


def test_inspect_names_pairs_gone_from_the_data_in_one_line_not_a_key_error(run_setup, capsys, monkeypatch):
    import mrpo.pipeline as pipeline
    from mrpo.cli import main
    from test_inspect_cli import inspect_config

    config = inspect_config(run_setup, "lost-pairs")
    assert main(["precompute", str(config)]) == 0
    # The data changed in a way no check saw: reading it again finds none of the cached pairs.
    monkeypatch.setattr(pipeline, "find_pairs", lambda *args: {})
    capsys.readouterr()
    assert main(["inspect", str(config), "--suspect-threshold", "0"]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("mrpo ")]
    assert "Traceback" not in err and "are no longer in" in line and "data.cache_tokenized=false" in line


def _stale_cache(tmp_path, run_setup, data_file):
    """A cache holding an entry whose data changed since, the current one, a dead and a live build, and two
    reference stores: one that opens, one without its key."""
    from mrpo.data.token_cache import BUILD_LOCK, start_build

    config = write_config(tmp_path, run_setup, data_file)
    tokenize(config)
    (old,) = entries(config)
    rows = data_file.read_text().splitlines()
    data_file.write_text("\n".join(rows[:-1]) + "\n")
    tokenize(config)
    (fresh,) = set(entries(config)) - {old}
    cache = Path(config.cache_dir)
    dead = cache / f".tokenized-{'4' * 32}-host-1-abc"
    dead.mkdir()
    (dead / BUILD_LOCK).write_bytes(b"")  # nobody holds its lock: the build was stopped
    live, lock = start_build(cache, "tokenized-" + "5" * 32)
    (cache / "store-good").mkdir()
    (cache / "store-good" / "key.json").write_text("{}")
    (cache / "store-nokey").mkdir()
    return config, cache, old, fresh, dead, live, lock


def test_cache_ls_shows_each_entry_its_source_and_whether_it_still_matches(
    tmp_path, run_setup, data_file, capsys
):
    from mrpo.cli import main

    config, cache, old, fresh, dead, live, lock = _stale_cache(tmp_path, run_setup, data_file)
    try:
        capsys.readouterr()
        assert main(["cache", "ls", "--cache-dir", str(cache)]) == 0
        out = capsys.readouterr().out
        line = {name: next(row for row in out.splitlines() if name in row)
                for name in (old, fresh, dead.name, live.name, "store-good", "store-nokey")}  # fmt: skip
        assert "*source changed" in line[old] and str(data_file.resolve()) in line[old]
        assert " current" in line[fresh] and str(data_file.resolve()) in line[fresh]
        assert "*dead build" in line[dead.name] and " live build" in line[live.name]
        assert " 0 shards" in line["store-good"] and "*key.json unreadable" in line["store-nokey"]
        assert all(unit in line[old] for unit in ("KB",)) and "mrpo cache prune --cache-dir" in out
        # A config names the same cache.
        assert main(["cache", "ls", str(tmp_path / "config.yaml")]) == 0

        # The same rows; the age column may have ticked over between the two listings.
        def without_ages(text: str) -> list[str]:
            return sorted(re.sub(r"\s\d+(\.\d+)?[smhd]\s", " ", row) for row in text.splitlines())

        assert without_ages(capsys.readouterr().out) == without_ages(out)
    finally:
        os.close(lock)


def test_cache_prune_removes_only_what_cannot_serve_and_dry_run_nothing(
    tmp_path, run_setup, data_file, capsys
):
    from mrpo.cli import main

    config, cache, old, fresh, dead, live, lock = _stale_cache(tmp_path, run_setup, data_file)
    try:
        before = sorted(p.name for p in cache.iterdir())
        capsys.readouterr()
        assert main(["cache", "prune", "--dry-run", "--cache-dir", str(cache)]) == 0
        out = capsys.readouterr().out
        assert sorted(p.name for p in cache.iterdir()) == before
        assert f"would remove {cache / old}" in out and f"would remove {dead}" in out and "2 entries" in out
        assert main(["cache", "prune", "--cache-dir", str(cache)]) == 0
        out = capsys.readouterr().out
        assert not (cache / old).exists() and not dead.exists()
        assert (cache / fresh).exists() and live.exists() and (cache / "store-nokey").exists()
        assert f"removed {cache / old}" in out and "removed 2 entries" in out and "KB freed" in out
        assert entries(config) == sorted([live.name, fresh])
        assert main(["cache", "prune", "--references", "--cache-dir", str(cache)]) == 0
        assert not (cache / "store-nokey").exists() and (cache / "store-good").exists() and live.exists()
        assert tokenize(config).pairs is None and entries(config) == sorted([live.name, fresh])  # served on
        assert main(["cache", "prune", "--source", str(data_file), "--cache-dir", str(cache)]) == 0
        assert not (cache / fresh).exists() and "removed 1 entry" in capsys.readouterr().out
    finally:
        os.close(lock)


def test_a_build_says_how_many_older_entries_of_its_data_remain_and_how_to_prune(
    tmp_path, run_setup, data_file, caplog
):
    config = write_config(tmp_path, run_setup, data_file)
    tokenize(config)
    data_file.write_text(data_file.read_text().splitlines()[0] + "\n")
    with caplog.at_level(logging.WARNING, logger="mrpo.data.token_cache"):
        tokenize(config)
    (line,) = [record.getMessage() for record in caplog.records if "of an older" in record.getMessage()]
    assert line.startswith(
        f"Tokenized entries of an older {data_file.resolve()} remain under {config.cache_dir}: 1 "
    )
    assert f"`mrpo cache prune --cache-dir {config.cache_dir}` removes them" in line


def _one_error_line(capsys, argv) -> str:
    from mrpo.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("mrpo ")]
    return line


def test_a_read_only_cache_is_one_line_naming_it_and_the_way_out(
    tmp_path, run_setup, data_file, monkeypatch, capsys
):
    import errno

    config = write_config(tmp_path, run_setup, data_file)
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # root ignores chmod: the mount's refusal, simulated
        if Path(path).resolve().is_relative_to(Path(config.cache_dir).resolve()):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    line = _one_error_line(capsys, ["precompute", str(tmp_path / "config.yaml")])
    assert f"cannot write the tokenized cache under {config.cache_dir}: the file system is read-only" in line
    assert "data.cache_tokenized=false" in line


def test_a_full_disk_while_tokenizing_is_one_line_and_leaves_no_build(
    tmp_path, run_setup, data_file, monkeypatch, capsys
):
    import errno

    from mrpo.data.token_store import PairWriter

    config = write_config(tmp_path, run_setup, data_file)

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PairWriter, "_flush", full)
    line = _one_error_line(capsys, ["precompute", str(tmp_path / "config.yaml")])
    assert f"cannot write the tokenized cache under {config.cache_dir}: no space left on the device" in line
    assert f"`mrpo cache prune --cache-dir {config.cache_dir}`" in line
    assert entries(config) == []  # the half-written build was removed


def test_a_non_ascii_byte_in_stored_pair_ids_is_one_cache_error_with_a_remedy_that_works(tmp_path):
    from mrpo.data.token_store import PairWriter, TokenizedPair, TokenizedSequence
    from mrpo.errors import CacheError

    writer = PairWriter(tmp_path / "store", remedy="delete it and run the command again")
    for name in ("aaaa", "bbbb"):
        writer.append(TokenizedPair(name, TokenizedSequence((1, 2), 1), TokenizedSequence((1, 3), 1)))
    writer.finish()
    path = tmp_path / "store" / "pair_ids.txt"
    path.write_bytes(b"aaaa\nb\xe9bb\n")
    with pytest.raises(CacheError) as caught:
        StoredPairs(tmp_path / "store", remedy="delete it and run the command again")
    assert str(caught.value) == (
        f"{path}: line 2 holds the byte 0xe9, and pair ids are ASCII: the store was damaged after it was written; "
        "delete it and run the command again"
    )


def test_truncating_for_two_tokenizers_is_a_config_error_naming_them(tmp_path, run_setup, data_file, capsys):
    write_config(tmp_path, run_setup, data_file, overflow="truncate")
    line = _one_error_line(capsys, ["precompute", str(tmp_path / "config.yaml")])
    assert "data.overflow=truncate needs all models to share one tokenizer" in line
    assert "policy (" in line and "gemma (" in line and "data.overflow=drop" in line


def test_worker_processes_store_the_entry_one_process_stores_under_the_same_key(
    tmp_path, run_setup, monkeypatch
):
    import random

    import mrpo.data.tokenization as tokenization
    from tiny_models import CORPUS

    monkeypatch.setattr(tokenization, "TOKENIZE_BLOCK", 4)  # blocks > what two workers hold at once
    rng = random.Random(0)
    words = " ".join(CORPUS).split()

    def text(most: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, most)))

    train = tmp_path / "train.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": text(30)}], "chosen": [{"role": "assistant", "content": text(40)}],
         "rejected": [{"role": "assistant", "content": text(40)}]}
        for _ in range(40)
    ]  # fmt: skip
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    built = {}
    for num_proc in (None, 2):
        root = tmp_path / f"num_proc-{num_proc}"
        root.mkdir()
        config = write_config(root, run_setup, train, max_length=250, num_proc=num_proc)
        built[num_proc] = (config, tokenize(config))
    (one_config, one), (two_config, two) = built[None], built[2]
    assert two.pairs is None and all(isinstance(view, StoredPairs) for view in two.tokenization.per_view)
    assert entries(one_config) == entries(two_config)  # num_proc is not part of the key
    assert one.tokenization.dropped and 10 < len(one.tokenization.pair_ids) < len(rows)
    assert list(two.tokenization.pair_ids) == list(one.tokenization.pair_ids)
    assert two.tokenization.dropped == one.tokenization.dropped and two.counts == one.counts
    # The entries hold the same bytes: every store file and the account.
    (one_entry,), (two_entry,) = (
        list(Path(config.cache_dir).glob("tokenized-*")) for config in (one_config, two_config)
    )
    files = sorted(path.relative_to(one_entry) for path in one_entry.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(two_entry) for path in two_entry.rglob("*") if path.is_file())
    for name in files:
        if name.name != ".build.lock":
            assert (one_entry / name).read_bytes() == (two_entry / name).read_bytes(), name
    # In memory (no cache) with worker processes: the same pairs again.
    memory = tokenize(
        write_config(
            tmp_path / "num_proc-2", run_setup, train, max_length=250, num_proc=2, cache_tokenized=False
        )
    )
    assert isinstance(memory.tokenization.per_view[0], TokenizedPairs)
    assert memory.tokenization.summary() == one.tokenization.summary()
    for mine, stored in zip(memory.tokenization.per_view, one.tokenization.per_view, strict=True):
        assert mine == stored
    # A run with num_proc finds the entry a run without it stored, without reading the data.
    monkeypatch.setattr(splits, "stream_split", lambda *args: pytest.fail("the data was read again"))
    found = tokenize(write_config(tmp_path / "num_proc-None", run_setup, train, max_length=250, num_proc=2))
    assert list(found.tokenization.pair_ids) == list(one.tokenization.pair_ids)
    assert entries(one_config) == entries(two_config)


def test_num_proc_is_shared_by_a_machines_processes_when_each_tokenizes_in_memory(monkeypatch):
    from mrpo.config.schema import DataConfig
    from mrpo.errors import ConfigError

    assert splits._num_proc_per_process(8) == 8 and splits._num_proc_per_process(None) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # accelerate launch on 4 GPUs: every process tokenizes
    assert [splits._num_proc_per_process(n) for n in (None, 1, 3, 8)] == [None, 1, 1, 2]
    with pytest.raises(ConfigError, match="data.num_proc"):
        DataConfig(train="pairs.jsonl", num_proc=0)
