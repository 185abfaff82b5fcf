"""The rules that turn one data row into a pair's texts, in the three formats of ``pairs.py``: standard strings,
conversational message lists, and whole conversations with an implicit prompt (as message lists, or as the
"\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts of Anthropic's HH-RLHF). A row that breaks a rule raises
``RowError`` with a short reason (what a drop is counted under), the field, and the sentence a user reads.
"""

from __future__ import annotations

import re
from typing import Any

ROW_RULES_VERSION = 2
"""Version of these rules (what a row becomes, and so its pair id); part of the tokenized cache's key.
2: implicit-prompt rows whose chosen/rejected are HH-RLHF transcripts are read (version 1 refused them)."""

TRANSCRIPT_FORMAT = "implicit (HH-RLHF transcripts)"
"""What a read summary calls rows read as HH-RLHF transcripts."""

Text = str | list[dict]
MESSAGE_ROLES = frozenset({"system", "user", "assistant", "tool"})
PAIR_FIELDS = ("prompt", "chosen", "rejected")


class RowError(Exception):
    """A bad row: ``reason`` is the short drop reason, ``detail`` the sentence a user reads."""

    def __init__(self, reason: str, field_name: str | None, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.field_name = field_name
        self.detail = detail


def row_format(row: Any, expected: str | None, expected_at: str) -> str:
    """The row's format, checked against the one fixed by ``fmt`` or detected from an earlier row."""
    if not isinstance(row, dict):
        raise RowError(
            "not an object",
            None,
            f"expected a JSON object with prompt/chosen/rejected, found {type(row).__name__}",
        )
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise RowError(
                f"missing field {name!r}",
                name,
                f"missing field {name!r} (every row needs chosen and rejected)",
            )
    prompt = row.get("prompt")
    if prompt is None:
        found = "implicit"
    elif isinstance(prompt, str):
        found = "standard"
    elif isinstance(prompt, list):
        found = "conversational"
    else:
        raise RowError(
            "wrong type", "prompt", f"expected a string or a list of messages, found {type(prompt).__name__}"
        )
    if expected is None or found == expected:
        return found
    if found == "implicit":
        raise RowError(
            "missing field 'prompt'",
            "prompt",
            f"missing field 'prompt' (the data is {expected}"
            + (f", as detected from {expected_at}" if expected_at else "")
            + ")",
        )
    source_of_format = f"detected from {expected_at}" if expected_at else "set by fmt"
    raise RowError(
        "format mismatch",
        "prompt",
        f"this row is {found} but the data is {expected} ({source_of_format}); make all rows one format",
    )


def parse_row(row: dict, row_format: str) -> tuple[Text, Text, Text, dict]:
    """Prompt, chosen, rejected and the other columns (metadata) of a row in ``row_format``; RowError if invalid."""
    metadata = {key: value for key, value in row.items() if key not in PAIR_FIELDS}
    if row_format == "implicit":
        prompt, chosen, rejected = _split_implicit(row["chosen"], row["rejected"])
    elif row_format == "standard":
        prompt = _require_text(row["prompt"], "prompt", empty_reason="empty prompt")
        chosen, rejected = (_standard_completion(row[name], name) for name in ("chosen", "rejected"))
    else:
        prompt = _require_messages(row["prompt"], "prompt")
        if _blank(prompt):
            raise RowError("empty prompt", "prompt", "the prompt has no content")
        chosen, rejected = (_conversational_completion(row[name], name) for name in ("chosen", "rejected"))
    return prompt, chosen, rejected, metadata


def _require_text(value: Any, name: str, *, empty_reason: str) -> str:
    if not isinstance(value, str):
        raise RowError("wrong type", name, f"expected a string, found {type(value).__name__}")
    if not value.strip():
        raise RowError(empty_reason, name, f"{name} is empty (or only whitespace)")
    return value


def _standard_completion(value: Any, name: str) -> str:
    if isinstance(value, list):
        raise RowError(
            "mixed types",
            name,
            f"{name} is a message list but prompt is a string; give the prompt as "
            "messages too (conversational) or the completion as a string (standard)",
        )
    return _require_text(value, name, empty_reason="empty completion")


def _conversational_completion(value: Any, name: str) -> list[dict]:
    # A plain-string completion under a conversational prompt is one assistant message (as in TRL).
    if isinstance(value, str):
        messages = [{"role": "assistant", "content": value}]
    else:
        messages = _require_messages(value, name, empty_reason="empty completion")
    _check_completion(messages, name)
    return messages


def _check_completion(messages: list[dict], name: str) -> None:
    if messages[0]["role"] != "assistant":
        raise RowError(
            "completion not from assistant",
            name,
            f"{name} must start with an assistant message, found role {messages[0]['role']!r}",
        )
    if messages[-1]["role"] != "assistant":
        # Every token of a completion is trained on as the model's own: a trailing user (or tool, or system) turn
        # would teach the policy to write the other side's text.
        raise RowError(
            "completion not ending with assistant",
            name,
            f"{name} ends with a {messages[-1]['role']!r} message (message {len(messages) - 1}); a completion is "
            "trained on as the model's own text and must end with the assistant's turn",
        )
    if _blank(messages):
        raise RowError("empty completion", name, f"{name} is empty (its messages have no content)")


def _require_messages(value: Any, name: str, *, empty_reason: str = "empty prompt") -> list[dict]:
    """Validated copy of a message list; None-valued extra keys are removed (see below)."""
    if not isinstance(value, list):
        raise RowError(
            "malformed message", name, f"expected a list of messages, found {type(value).__name__}"
        )
    if not value:
        raise RowError(empty_reason, name, f"{name} is an empty message list")
    return [_require_message(message, name, index) for index, message in enumerate(value)]


def _require_message(message: Any, name: str, index: int) -> dict:
    where = f"message {index} of {name}"
    if not isinstance(message, dict):
        raise RowError(
            "malformed message",
            name,
            f"{where} is a {type(message).__name__}, not an object with role and content",
        )
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:
        found = "no role" if role is None else f"role {role!r}"
        raise RowError(
            "malformed message", name, f"{where} has {found}; role must be one of {sorted(MESSAGE_ROLES)}"
        )
    if not isinstance(content, str):
        raise RowError(
            "malformed message",
            name,
            f"{where} has content of type {type(content).__name__}; content must be a string",
        )
    # Arrow-backed sources (Parquet, datasets) give every message every key seen in the column, set to None
    # where absent; dropping None-valued extras keeps the pair id the same whichever file type held the rows.
    return {key: item for key, item in message.items() if item is not None}


def _blank(messages: list[dict]) -> bool:
    return not any(message["content"].strip() for message in messages)


def _split_implicit(chosen: Any, rejected: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """Split two whole conversations into (shared prompt, chosen remainder, rejected remainder)."""
    if is_transcript(chosen) and is_transcript(rejected):
        return _split_transcripts(chosen, rejected)
    for name, value, other in (("chosen", chosen, rejected), ("rejected", rejected, chosen)):
        if is_transcript(other) and isinstance(value, str):
            raise RowError(
                "malformed transcript",
                name,
                f"{'rejected' if name == 'chosen' else 'chosen'} is an HH-RLHF transcript but {name} is not (it "
                "does not start with 'Human:'); both must be transcripts of the same conversation",
            )
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise RowError(
            "missing field 'prompt'",
            "prompt",
            "no 'prompt' field and chosen/rejected are strings: "
            "implicit prompts need chosen/rejected as message lists (a shared string prefix is "
            "ambiguous); add a 'prompt' column",
        )
    chosen = _require_messages(chosen, "chosen", empty_reason="empty completion")
    rejected = _require_messages(rejected, "rejected", empty_reason="empty completion")
    if chosen == rejected:
        # Identical conversations share every message; the prompt is what precedes the final assistant turns.
        shared = len(chosen)
        while shared > 0 and chosen[shared - 1]["role"] == "assistant":
            shared -= 1
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
    if shared == 0:
        raise RowError(
            "no shared prompt",
            "chosen",
            "no 'prompt' field, and chosen and rejected share no "
            "leading message, so no prompt can be inferred; add a 'prompt' column or start both "
            "conversations with the same prompt messages",
        )
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(conversation):
            raise RowError(
                "empty completion",
                name,
                f"{name} ends where the shared prompt ends (message "
                f"{shared - 1}), so its completion is empty",
            )
        if conversation[shared]["role"] != "assistant":
            raise RowError(
                "completion not from assistant",
                name,
                f"chosen and rejected diverge at message "
                f"{shared}, a {conversation[shared]['role']!r} message in {name}; the part after the "
                "shared prompt must start with an assistant message",
            )
        _check_completion(conversation[shared:], name)
    return chosen[:shared], chosen[shared:], rejected[shared:]


# HH-RLHF transcripts: "\n\nHuman: ...\n\nAssistant: ..." strings. A turn begins only where "Human:" or
# "Assistant:" follows a blank line (or opens the text), so "Human:" inside a line is part of the turn's text.
_TRANSCRIPT_START = re.compile(r"\s*Human:")
_TURN_SEPARATOR = re.compile(r"\n\n(Human|Assistant):")
_TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def is_transcript(value: Any) -> bool:
    """Whether ``value`` is an HH-RLHF transcript: a string whose first non-blank text is "Human:"."""
    return isinstance(value, str) and _TRANSCRIPT_START.match(value) is not None


def transcript_messages(text: str) -> list[dict]:
    """The user/assistant messages of an HH-RLHF transcript; each turn's content without surrounding whitespace
    (the transcripts put a space after the colon, and some a trailing space or newline)."""
    parts = _TURN_SEPARATOR.split("\n\n" + text.lstrip())
    return [
        {"role": _TRANSCRIPT_ROLES[parts[i]], "content": parts[i + 1].strip()}
        for i in range(1, len(parts), 2)
    ]


def _split_transcripts(chosen: str, rejected: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Two transcripts of one conversation: every turn but the last is the prompt, and the last turn of each, an
    assistant's answer, is its completion."""
    conversations = {"chosen": transcript_messages(chosen), "rejected": transcript_messages(rejected)}
    for name, messages in conversations.items():
        if messages[-1]["role"] != "assistant":
            raise RowError(
                "completion not ending with assistant",
                name,
                f"the {name} transcript ends with a Human turn (turn {len(messages) - 1}); its last turn must be "
                "the Assistant's answer, the completion",
            )
    chosen_messages, rejected_messages = conversations["chosen"], conversations["rejected"]
    prompt = chosen_messages[:-1]
    if prompt != rejected_messages[:-1]:
        raise RowError("transcripts diverge before the last turn", "rejected", _divergence(conversations))
    if _blank(prompt):
        raise RowError("empty prompt", "chosen", "the transcripts' Human turns have no content")
    for name, messages in conversations.items():
        if not messages[-1]["content"]:
            raise RowError("empty completion", name, f"the last Assistant turn of {name} is empty")
    return prompt, chosen_messages[-1:], rejected_messages[-1:]


def _divergence(conversations: dict[str, list[dict]]) -> str:
    chosen, rejected = conversations["chosen"], conversations["rejected"]
    turn = next(
        (i for i, (one, other) in enumerate(zip(chosen, rejected, strict=False)) if one != other),
        min(len(chosen), len(rejected)),
    )
    return (
        f"chosen ({len(chosen)} turns) and rejected ({len(rejected)} turns) differ at turn {turn}, before their "
        "last turns; the transcripts of a pair must share every turn but the final Assistant answer (the prompt "
        "is what they share, each completion the one answer that follows it)"
    )
