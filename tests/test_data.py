"""Tests for mrpo.data.sources: every source type, every row format, pair ids, subsampling and the bad-data corpus."""

from __future__ import annotations

import collections
import hashlib
import json
import time
import warnings
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mrpo.data.pairs import PairSet, PreferencePair, subsample
from mrpo.data.sources import load_pairs, pairs_from_records
from mrpo.errors import DataError

BAD_DIR = Path(__file__).parent / "data" / "bad"


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict:
    return {"role": "system", "content": content}


STANDARD_RECORDS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "kind": "arithmetic"},
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "kind": "fact"},
    {"prompt": "Is ice cold?", "chosen": "Yes.", "rejected": "No.", "kind": "fact"},
]
CONVERSATIONAL_RECORDS = [
    {
        "prompt": [system("Be brief."), user("What is 2+2?")],
        "chosen": [assistant("4")],
        "rejected": [assistant("5")],
        "kind": "arithmetic",
    },
    # Only this message has a "name" key: Arrow sources give the other messages name=None, which must not
    # change the pair ids.
    {
        "prompt": [{"role": "user", "content": "Capital of France?", "name": "ada"}],
        "chosen": [assistant("Paris.")],
        "rejected": [assistant("Lyon.")],
        "kind": "fact",
    },
]


def write_source(records: list[dict], tmp_path: Path, kind: str) -> Path:
    """Write the same records as one source type; returns what to pass to load_pairs."""
    if kind == "jsonl":
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif kind == "json":
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps(records))
    elif kind == "json-data":
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps({"data": records}))
    elif kind == "parquet":
        path = tmp_path / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    elif kind == "saved-dataset":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    elif kind == "saved-dataset-dict":
        path = tmp_path / "saved_dict"
        other = datasets.Dataset.from_list(records[:1])
        datasets.DatasetDict({"train": other, "test": datasets.Dataset.from_list(records)}).save_to_disk(
            str(path)
        )
    else:
        raise AssertionError(kind)
    return path


SOURCE_KINDS = ["jsonl", "json", "json-data", "parquet", "saved-dataset", "saved-dataset-dict"]


@pytest.mark.parametrize(
    "records", [STANDARD_RECORDS, CONVERSATIONAL_RECORDS], ids=["standard", "conversational"]
)
@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_every_source_type_reads_the_same_pairs(tmp_path, records, kind):
    expected = pairs_from_records(records)
    split = "test" if kind == "saved-dataset-dict" else "train"
    loaded = load_pairs(write_source(records, tmp_path, kind), split=split)
    assert [pair.pair_id for pair in loaded] == [pair.pair_id for pair in expected]
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded] == [
        (p.prompt, p.chosen, p.rejected) for p in expected
    ]
    assert [pair.metadata for pair in loaded] == [{"kind": record["kind"]} for record in records]
    assert loaded.fingerprint == expected.fingerprint
    assert loaded.rows_read == len(records) and not loaded.dropped
    if kind == "saved-dataset-dict":
        assert "(split test)" in loaded.source


def test_saved_dataset_dict_with_missing_split_lists_the_splits(tmp_path):
    path = write_source(STANDARD_RECORDS, tmp_path, "saved-dataset-dict")
    with pytest.raises(DataError, match=r"no split 'validation'; available splits: \['test', 'train'\]"):
        load_pairs(path, split="validation")


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(json.dumps(STANDARD_RECORDS[0]) + "\n")
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_pairs(tmp_path)


def test_nonexistent_hub_id_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError, match="neither a local file nor a reachable hub dataset") as raised:
        load_pairs("mrpo-tests/no-such-dataset")
    assert time.monotonic() - start < 30
    assert "'mrpo-tests/no-such-dataset'" in str(raised.value) and "Offline mode" in str(raised.value)


@pytest.mark.parametrize("source", ["./missing/pairs.jsonl", "missing.parquet", "/no/such/dir/pairs"])
def test_nonexistent_path_is_not_sent_to_the_hub(source):
    with pytest.raises(DataError, match="no such file or directory"):
        load_pairs(source)


# ------------------------------------------------------------------------------------------------------------
# Formats


def test_standard_format_keeps_strings_and_metadata():
    pair_set = pairs_from_records(STANDARD_RECORDS)
    first = pair_set[0]
    assert (first.prompt, first.chosen, first.rejected) == ("What is 2+2?", "4", "5")
    assert first.metadata == {"kind": "arithmetic"} and not first.conversational
    assert len(pair_set) == 3 and list(pair_set) == pair_set.pairs


def test_conversational_string_completions_become_assistant_messages():
    pair = pairs_from_records([{"prompt": [user("2+2?")], "chosen": "4", "rejected": [assistant("5")]}])[0]
    assert pair.conversational
    assert pair.chosen == [assistant("4")] and pair.rejected == [assistant("5")]


def test_implicit_prompt_multi_turn_with_system_message():
    shared = [system("Answer in one word."), user("Hi."), assistant("Hello."), user("Opposite of hot?")]
    row = {
        "chosen": shared + [assistant("Cold.")],
        "rejected": shared + [assistant("Warm."), user("Sure?"), assistant("Yes.")],
        "id": 7,
    }
    pair = pairs_from_records([row])[0]
    assert pair.prompt == shared
    assert pair.chosen == [assistant("Cold.")]
    assert pair.rejected == [assistant("Warm."), user("Sure?"), assistant("Yes.")]
    assert pair.metadata == {"id": 7}
    # The split pair is the same pair as the explicit conversational row.
    explicit = {"prompt": shared, "chosen": pair.chosen, "rejected": pair.rejected}
    assert pairs_from_records([explicit])[0].pair_id == pair.pair_id


def test_implicit_identical_conversations_split_before_the_final_assistant_turn():
    conversation = [user("2+2?"), assistant("4")]
    with pytest.warns(UserWarning, match="1 rows have chosen == rejected"):
        pair_set = pairs_from_records([{"chosen": conversation, "rejected": list(conversation)}])
    assert pair_set[0].prompt == [user("2+2?")] and pair_set[0].chosen == [assistant("4")]
    assert pair_set.identical == 1


def test_explicit_fmt_holds_rows_to_it():
    with pytest.raises(
        DataError, match=r"this row is standard but the data is conversational \(set by fmt\)"
    ):
        pairs_from_records(STANDARD_RECORDS, fmt="conversational")
    with pytest.raises(
        DataError, match="field 'prompt'.*this row is conversational but the data is implicit"
    ):
        pairs_from_records(CONVERSATIONAL_RECORDS, fmt="implicit")
    assert len(pairs_from_records(STANDARD_RECORDS, fmt="standard")) == 3


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="on_error"):
        pairs_from_records(STANDARD_RECORDS, on_error="skip")
    with pytest.raises(ValueError, match="fmt"):
        pairs_from_records(STANDARD_RECORDS, fmt="chatml")


# ------------------------------------------------------------------------------------------------------------
# Pair ids and fingerprints


def test_pair_id_is_the_documented_content_hash():
    canonical = '{"chosen":"4","prompt":"What is 2+2?","rejected":"5"}'  # sorted keys, no spaces
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert pairs_from_records(STANDARD_RECORDS[:1])[0].pair_id == expected


def test_pair_id_ignores_row_order_and_metadata_but_not_text():
    forward = pairs_from_records(STANDARD_RECORDS)
    backward = pairs_from_records(list(reversed(STANDARD_RECORDS)))
    assert {pair.pair_id for pair in forward} == {pair.pair_id for pair in backward}
    assert forward.fingerprint != backward.fingerprint  # the fingerprint is over the ordered ids
    relabelled = pairs_from_records([{**record, "kind": "other", "extra": 1} for record in STANDARD_RECORDS])
    assert [pair.pair_id for pair in relabelled] == [pair.pair_id for pair in forward]
    assert relabelled.fingerprint == forward.fingerprint
    edited = pairs_from_records([{**STANDARD_RECORDS[0], "rejected": "5 "}])
    assert edited[0].pair_id != forward[0].pair_id
    swapped = pairs_from_records([{**STANDARD_RECORDS[0], "chosen": "5", "rejected": "4"}])
    assert swapped[0].pair_id != forward[0].pair_id


def test_pairs_compare_by_content_and_hash_by_id():
    first, again = (
        pairs_from_records(CONVERSATIONAL_RECORDS)[0],
        pairs_from_records(CONVERSATIONAL_RECORDS)[0],
    )
    again_with_metadata = PreferencePair(again.pair_id, again.prompt, again.chosen, again.rejected, {"x": 1})
    assert first == again_with_metadata and len({first, again_with_metadata}) == 1


# ------------------------------------------------------------------------------------------------------------
# Subsampling


def many_records(count: int) -> list[dict]:
    return [{"prompt": f"What is {i}+1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(count)]


def ids(pair_set: PairSet) -> list[str]:
    return [pair.pair_id for pair in pair_set]


def test_subsample_is_seed_stable_nested_and_in_original_order():
    full = pairs_from_records(many_records(300))
    small, large = subsample(full, 32, seed=3), subsample(full, 128, seed=3)
    assert ids(small) == ids(subsample(full, 32, seed=3))
    assert len(small) == 32 and len(large) == 128
    assert set(ids(small)) <= set(ids(large))
    positions = {pair_id: index for index, pair_id in enumerate(ids(full))}
    assert [positions[i] for i in ids(small)] == sorted(positions[i] for i in ids(small))
    assert set(ids(subsample(full, 32, seed=4))) != set(ids(small))
    # Independent of row order: the same pairs are chosen from a shuffled file.
    shuffled = pairs_from_records(list(reversed(many_records(300))))
    assert set(ids(subsample(shuffled, 32, seed=3))) == set(ids(small))
    assert small.rows_read == 300 and sum(small.dropped.values()) == 300 - 32
    assert "not in subsample (max_pairs=32, seed=3): 268" in small.summary()


def test_subsample_larger_than_the_set_returns_everything():
    full = pairs_from_records(many_records(10))
    assert ids(subsample(full, 10, seed=0)) == ids(full) == ids(subsample(full, 1000, seed=5))
    assert not subsample(full, 10, seed=0).dropped
    with pytest.raises(ValueError, match="at least 1"):
        subsample(full, 0, seed=0)


def test_max_pairs_option_subsamples(tmp_path):
    path = write_source(many_records(50), tmp_path, "jsonl")
    loaded = load_pairs(path, max_pairs=8, seed=1)
    assert ids(loaded) == ids(subsample(load_pairs(path), 8, seed=1))


# ------------------------------------------------------------------------------------------------------------
# Identical pairs, drops and the summary


IDENTICAL_RECORDS = STANDARD_RECORDS + [
    {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "Hi."},
    {"prompt": "Say bye.", "chosen": "Bye.", "rejected": "Bye."},
]


def test_identical_pairs_are_counted_warned_and_kept():
    with pytest.warns(
        UserWarning, match=r"2 rows have chosen == rejected \(first: row index 3 \(0-based\)\)"
    ):
        pair_set = pairs_from_records(IDENTICAL_RECORDS)
    assert pair_set.identical == 2 and len(pair_set) == 5 and not pair_set.dropped
    assert "2 rows have chosen == rejected (kept)" in pair_set.summary()


def test_identical_pairs_dropped_on_request():
    with pytest.warns(UserWarning, match="Dropped"):
        pair_set = pairs_from_records(IDENTICAL_RECORDS, drop_identical=True)
    assert pair_set.identical == 2 and len(pair_set) == 3
    assert pair_set.dropped == {"identical chosen and rejected": 2}
    assert "identical chosen and rejected: 2" in pair_set.summary()


def test_no_warning_without_identical_pairs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pairs_from_records(STANDARD_RECORDS).identical == 0


def test_summary_accounts_for_every_row():
    records = STANDARD_RECORDS + [
        {"prompt": "x", "chosen": ""},
        {"prompt": "y", "chosen": "", "rejected": "z"},
        5,
    ]
    pair_set = pairs_from_records(records, source="mixed.jsonl", on_error="drop")
    assert pair_set.rows_read == len(pair_set) + sum(pair_set.dropped.values()) == 6
    summary = pair_set.summary()
    assert summary.startswith("Read 6 rows from mixed.jsonl; kept 3 standard pairs; dropped 3 (")
    for reason in ("missing field 'rejected': 1", "empty completion: 1", "not an object: 1"):
        assert reason in summary


def test_parquet_errors_name_the_zero_based_row_index(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.Table.from_pylist(STANDARD_RECORDS[:2] + [{"prompt": "p", "chosen": "c", "rejected": None}]), path
    )
    with pytest.raises(
        DataError, match=r"pairs\.parquet, row index 2 \(0-based\), field 'rejected': missing"
    ):
        load_pairs(path)
    assert load_pairs(path, on_error="drop").dropped == {"missing field 'rejected'": 1}


# ------------------------------------------------------------------------------------------------------------
# The bad-data corpus: every file in tests/data/bad/, its error and its drops.

# file -> (reason fragment, row, field, drops with on_error="drop": (pairs kept, {reason: count}) or None when
# the file cannot be read at all / nothing is left, so drop mode raises too).
BAD_FILES: dict[str, tuple[str, str | None, str | None, tuple[int, dict] | None]] = {
    "all_rows_bad.jsonl": ("is empty (or only whitespace)", "line 1", "chosen", None),
    "completion_not_assistant.jsonl": (
        "must start with an assistant message, found role 'user'",
        "line 2",
        "chosen",
        (1, {"completion not from assistant": 1}),
    ),
    "completion_user_turn.jsonl": (
        "chosen ends with a 'user' message (message 1)",
        "line 2",
        "chosen",
        (2, {"completion not ending with assistant": 1}),
    ),
    "empty.jsonl": ("no rows", None, None, None),
    "empty_chosen.jsonl": ("chosen is empty", "line 2", "chosen", (1, {"empty completion": 1})),
    "empty_message_list.jsonl": (
        "rejected is an empty message list",
        "line 2",
        "rejected",
        (1, {"empty completion": 1}),
    ),
    "empty_prompt.jsonl": ("prompt is empty", "line 1", "prompt", (2, {"empty prompt": 1})),
    "format_mismatch.jsonl": (
        "this row is conversational but the data is standard (detected from line 1)",
        "line 2",
        "prompt",
        (2, {"format mismatch": 1}),
    ),
    "implicit_diverge_at_user.jsonl": (
        "diverge at message 2, a 'user' message",
        "line 2",
        "chosen",
        (2, {"completion not from assistant": 1}),
    ),
    "implicit_empty_remainder.jsonl": (
        "rejected ends where the shared prompt ends",
        "line 2",
        "rejected",
        (1, {"empty completion": 1}),
    ),
    "implicit_no_shared_prompt.jsonl": (
        "share no leading message",
        "line 2",
        "chosen",
        (2, {"no shared prompt": 1}),
    ),
    "implicit_string_rows.jsonl": (
        "implicit prompts need chosen/rejected as message lists",
        "line 1",
        "prompt",
        (1, {"missing field 'prompt'": 2}),
    ),
    "invalid_json.jsonl": ("invalid JSON", "line 3", None, (3, {"invalid JSON": 1})),
    "invalid_utf8.jsonl": ("not valid UTF-8", "line 2", None, (2, {"invalid UTF-8": 1})),
    "json_syntax_error.json": ("invalid JSON at line 3", "line 3", None, None),
    "json_wrong_shape.json": ('expected a JSON list of row objects or {"data": [...]}', None, None, None),
    "message_bad_role.jsonl": (
        "message 0 of rejected has role 'bot'",
        "line 3",
        "rejected",
        (2, {"malformed message": 1}),
    ),
    "message_missing_role.jsonl": (
        "message 0 of prompt has no role",
        "line 1",
        "prompt",
        (1, {"malformed message": 1}),
    ),
    "message_nonstring_content.json": (
        "message 0 of chosen has content of type NoneType",
        "row index 2 (0-based)",
        "chosen",
        (2, {"malformed message": 1}),
    ),
    "message_not_object.jsonl": (
        "message 0 of prompt is a str",
        "line 2",
        "prompt",
        (1, {"malformed message": 1}),
    ),
    "messages_not_list.jsonl": (
        "expected a list of messages, found dict",
        "line 2",
        "chosen",
        (2, {"malformed message": 1}),
    ),
    "missing_chosen.json": (
        "missing field 'chosen'",
        "row index 1 (0-based)",
        "chosen",
        (2, {"missing field 'chosen'": 1}),
    ),
    "missing_rejected.jsonl": (
        "missing field 'rejected'",
        "line 3",
        "rejected",
        (2, {"missing field 'rejected'": 1}),
    ),
    "mixed_types.jsonl": (
        "chosen is a message list but prompt is a string",
        "line 2",
        "chosen",
        (1, {"mixed types": 1}),
    ),
    "nonstring_chosen.jsonl": ("expected a string, found int", "line 2", "chosen", (2, {"wrong type": 1})),
    "not_object.jsonl": ("expected a JSON object", "line 2", None, (2, {"not an object": 1})),
    "null_prompt.jsonl": ("missing field 'prompt'", "line 2", "prompt", (2, {"missing field 'prompt'": 1})),
    "prompt_wrong_type.jsonl": (
        "expected a string or a list of messages, found int",
        "line 1",
        "prompt",
        (1, {"wrong type": 1}),
    ),
    "unsupported.csv": ("unsupported file type '.csv'. Supported sources: .jsonl, .json", None, None, None),
    "whitespace_rejected.jsonl": (
        "rejected is empty (or only whitespace)",
        "line 3",
        "rejected",
        (2, {"empty completion": 1}),
    ),
}


def test_bad_corpus_matches_the_table_and_the_readme():
    files = {path.name for path in BAD_DIR.iterdir() if path.name != "README.md"}
    assert files == set(BAD_FILES)
    assert len(files) >= 18
    readme = (BAD_DIR / "README.md").read_text()
    assert {name for name in files if f"`{name}`" not in readme} == set()


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file(name):
    fragment, row, field, drops = BAD_FILES[name]
    with pytest.raises(DataError) as raised:
        load_pairs(BAD_DIR / name)
    message = str(raised.value)
    assert name in message and fragment in message
    assert raised.value.row == row and raised.value.field == field
    if row is not None:
        assert f"{name}, {row}" in message or f"at {row}" in message
    if field is not None:
        assert f"field '{field}'" in message

    if drops is None:
        with pytest.raises(DataError, match=name):
            load_pairs(BAD_DIR / name, on_error="drop")
        return
    kept, reasons = drops
    pair_set = load_pairs(BAD_DIR / name, on_error="drop")
    assert len(pair_set) == kept and pair_set.dropped == collections.Counter(reasons)
    assert pair_set.rows_read == kept + sum(reasons.values())
    if raised.value.reason is not None:
        assert raised.value.reason in reasons  # the error and the drop use the same reason


def test_all_bad_rows_in_drop_mode_lists_the_reasons():
    with pytest.raises(
        DataError, match=r"no valid rows left: .*dropped 3 \(empty completion: 2, missing field"
    ):
        load_pairs(BAD_DIR / "all_rows_bad.jsonl", on_error="drop")


def test_a_file_whose_rows_are_all_dropped_says_kept_0_pairs_not_a_format(tmp_path):
    path = tmp_path / "conversational.jsonl"
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}  # fmt: skip
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as raised:
        load_pairs(path, on_error="drop")
    assert "kept 0 pairs; dropped 1 (completion not from assistant: 1)" in str(raised.value)
    assert "standard" not in str(raised.value)


def test_a_completion_may_hold_tool_turns_but_must_end_with_the_assistant(tmp_path):
    def record(chosen):
        return {"prompt": [{"role": "user", "content": "weather?"}], "chosen": chosen,
                "rejected": [{"role": "assistant", "content": "no idea"}]}  # fmt: skip

    calling = [{"role": "assistant", "content": "call"}, {"role": "tool", "content": "12C"},
               {"role": "assistant", "content": "It is 12C."}]  # fmt: skip
    assert len(pairs_from_records([record(calling)])) == 1
    with pytest.raises(DataError, match="chosen ends with a 'tool' message"):
        pairs_from_records([record(calling[:2])])


def test_json_errors_and_hints_read_well(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q2", "chosen": "unterminated\n'
    )
    with pytest.raises(DataError) as raised:
        load_pairs(path)
    message = str(raised.value)
    assert "line 2: invalid JSON at column 41: Invalid control character at;" in message
    assert "at at" not in message
    assert "set data.on_error=drop to skip such rows" in message  # the key as a user writes it


def test_a_missing_split_names_the_config_key(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(STANDARD_RECORDS)}).save_to_disk(
        tmp_path / "saved"
    )
    with pytest.raises(
        DataError, match=r"no split 'test'; available splits: \['train'\]\. Set data.train_split"
    ):
        load_pairs(tmp_path / "saved", split="test")
