"""Tests for HH-RLHF transcripts as implicit-prompt rows: how a transcript becomes a prompt and completions, the rows
that are refused or dropped, and what the read's account says."""

from __future__ import annotations

import collections
import gzip
import json

import pytest

from mrpo.data.pairs import PairCounts
from mrpo.data.sources import load_pairs, pairs_from_records, stream_pairs
from mrpo.errors import DataError


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def transcript(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def test_hh_transcripts_become_a_shared_prompt_and_the_final_answers(tmp_path):
    shared = [("Human", "Is a tomato a fruit? My friend said Human: yes."), ("Assistant", "Botanically, yes."),
              ("Human", ""), ("Assistant", "")]  # fmt: skip
    row = {
        # Leading/trailing whitespace around the text and the turns, and "Human:" inside a line (not a turn).
        "chosen": "  "
        + transcript(*shared, ("Human", "And a cucumber?  "), ("Assistant", "Also a fruit."))
        + "\n",
        "rejected": transcript(*shared, ("Human", "And a cucumber?"), ("Assistant", "A vegetable. ")),
    }
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(row) + "\n")
    pair_set = load_pairs(path)
    pair = pair_set[0]
    assert pair.prompt == [user("Is a tomato a fruit? My friend said Human: yes."), assistant("Botanically, yes."),
                           user(""), assistant(""), user("And a cucumber?")]  # fmt: skip
    assert pair.chosen == [assistant("Also a fruit.")] and pair.rejected == [assistant("A vegetable.")]
    # The same pair as the message-list row of the same conversation, so the same pair id.
    as_messages = {"chosen": pair.prompt + pair.chosen, "rejected": pair.prompt + pair.rejected}
    assert pairs_from_records([as_messages])[0].pair_id == pair.pair_id
    assert pair_set.summary() == (
        f"Read 1 rows from {path} (format implicit (HH-RLHF transcripts)); kept 1 conversational pairs; dropped 0."
    )


def test_a_streamed_read_of_transcripts_says_so_in_its_account(tmp_path):
    path = tmp_path / "hh.jsonl"
    rows = [{"chosen": transcript(("Human", f"{i}+1?"), ("Assistant", str(i + 1))),
             "rejected": transcript(("Human", f"{i}+1?"), ("Assistant", str(i)))} for i in range(3)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stream = stream_pairs(path)
    assert len(list(stream)) == 3
    counts = stream.counts()
    assert (
        counts.transcripts == 3 and PairCounts.from_dict(counts.to_dict()) == counts
    )  # as the cache stores it
    assert "(format implicit (HH-RLHF transcripts)); kept 3 conversational pairs" in counts.summary()


def test_message_list_implicit_rows_keep_their_pair_id():
    row = {"chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]}
    assert pairs_from_records([row])[0].pair_id == "aacafefc011724ab"  # as ROW_RULES_VERSION 1 made it
    assert "HH-RLHF" not in pairs_from_records([row]).summary()


def test_gzip_jsonl_is_read_and_a_corrupt_one_is_one_error(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    row = {"chosen": transcript(("Human", "Hi"), ("Assistant", "Hello")),
           "rejected": transcript(("Human", "Hi"), ("Assistant", "Go away"))}  # fmt: skip
    path.write_bytes(gzip.compress((json.dumps(row) + "\n").encode()))
    assert load_pairs(path)[0].rejected == [assistant("Go away")]
    path.write_bytes(gzip.compress((json.dumps(row) + "\n").encode() * 50)[:-30])
    with pytest.raises(DataError, match=r"hh.jsonl.gz: cannot decompress after line \d+ .*cut short"):
        load_pairs(path)


HH_BAD_ROWS = {
    "earlier turn differs": (
        "transcripts diverge before the last turn",
        "rejected",
        "differ at turn 1, before their last turns",
        {"chosen": transcript(("Human", "Hi"), ("Assistant", "Hello"), ("Human", "Joke?"), ("Assistant", "No.")),
         "rejected": transcript(("Human", "Hi"), ("Assistant", "Hey"), ("Human", "Joke?"), ("Assistant", "Ok."))},
    ),
    # One side has an extra Assistant turn (the published data has such rows): not one shared conversation.
    "extra assistant turn": (
        "transcripts diverge before the last turn",
        "rejected",
        "chosen (3 turns) and rejected (2 turns) differ at turn 2",
        {"chosen": transcript(("Human", "Hi"), ("Assistant", "Hello"), ("Assistant", "Anyone?")),
         "rejected": transcript(("Human", "Hi"), ("Assistant", "Hello"))},
    ),
    "ends with a human turn": (
        "completion not ending with assistant",
        "chosen",
        "the chosen transcript ends with a Human turn (turn 2)",
        {"chosen": transcript(("Human", "Hi"), ("Assistant", "Hello"), ("Human", "Bye")),
         "rejected": transcript(("Human", "Hi"), ("Assistant", "Go away"))},
    ),
    "empty last assistant turn": (
        "empty completion",
        "rejected",
        "the last Assistant turn of rejected is empty",
        {"chosen": transcript(("Human", "Hi"), ("Assistant", "Hello")),
         "rejected": "\n\nHuman: Hi\n\nAssistant: "},
    ),
    "empty human turns": (
        "empty prompt",
        "chosen",
        "the transcripts' Human turns have no content",
        {"chosen": transcript(("Human", " "), ("Assistant", "Hello")),
         "rejected": transcript(("Human", ""), ("Assistant", "Go away"))},
    ),
    "one side not a transcript": (
        "malformed transcript",
        "rejected",
        "chosen is an HH-RLHF transcript but rejected is not",
        {"chosen": transcript(("Human", "Hi"), ("Assistant", "Hello")), "rejected": "Hello"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HH_BAD_ROWS))
def test_a_bad_hh_transcript_row_is_an_error_naming_it_or_a_counted_drop(case, tmp_path):
    reason, field, fragment, bad = HH_BAD_ROWS[case]
    good = {"chosen": transcript(("Human", "2+2?"), ("Assistant", "4")),
            "rejected": transcript(("Human", "2+2?"), ("Assistant", "5"))}  # fmt: skip
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as raised:
        load_pairs(path)
    assert raised.value.row == "line 2" and raised.value.field == field
    assert f"{path}, line 2, field '{field}': " in str(raised.value) and fragment in str(raised.value)
    pair_set = load_pairs(path, on_error="drop")
    assert len(pair_set) == 1 and pair_set.dropped == collections.Counter({reason: 1})
    assert raised.value.reason == reason
    assert "(format implicit (HH-RLHF transcripts)" in pair_set.summary()
