"""Prompts for RL from a chat data file: the same files SFT reads, cut before the reply.

`read_chat_prompts(path_or_name)` reads records as `load_sft_dataset` does (a `.jsonl` file line
by line, a `.parquet` file, a dataset directory or a hub name) in any of these forms:

    {"messages": [..., {"role": "user", ...}]}                      a prompt, no reference answer
    {"messages": [..., {"role": "user", ...}, {"role": "assistant", "content": A}]}
    {"prompt": "...", "completion": A}   or   {"prompt": "...", "answer": A}   or  {"prompt": "..."}

The prompt is the conversation up to its last user turn; a final assistant turn becomes the
reference answer `A` a reward may compare against. Every other field of the record (test cases,
a difficulty, an id) is kept in `extra`, for rewards that need more than an answer. Bad records
raise `SFTDataError` naming the file and the line, like the SFT loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollouts.data.sft import SFTDataError, _checked_messages, _parsed_record, _read_records

__all__ = ["ChatPrompt", "read_chat_prompts"]

_ANSWER_KEYS = ("completion", "answer")


@dataclass(frozen=True, kw_only=True)
class ChatPrompt:
    """One prompt of a data file: the messages a policy answers, and what a reward may use."""

    messages: tuple[dict[str, str], ...]  # ends with a user turn
    answer: str | None  # the record's reference answer, if it has one
    extra: dict[str, Any] = field(default_factory=dict)  # the record's other fields
    where: str = ""  # "file.jsonl line 3"


def read_chat_prompts(
    path_or_name: str | Path, *, limit: int | None = None, split: str = "train"
) -> list[ChatPrompt]:
    """The prompts of a chat data file, in file order, at most `limit`."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}; must be >= 1 or None")
    records, source, unit = _read_records(path_or_name, split)
    prompts: list[ChatPrompt] = []
    for index, record in enumerate(records):
        if limit is not None and len(prompts) >= limit:
            break
        if isinstance(record, str) and not record.strip():
            continue  # a blank line of a JSONL file
        prompts.append(_prompt_of(record, f"{source} {unit} {index + 1}"))
    if not prompts:
        raise SFTDataError(f"{source}: no prompt in it; expected chat records with a user turn")
    return prompts


def _prompt_of(raw: Any, where: str) -> ChatPrompt:
    record = _parsed_record(raw, where)
    if record.get("messages") is not None:
        messages = _checked_messages(record["messages"], where, need_assistant=False)
        answer = None
        if messages[-1]["role"] == "assistant":
            answer = messages.pop()["content"]
        if not messages or messages[-1]["role"] != "user":
            raise SFTDataError(
                f"{where}: the messages before the final reply must end with a user turn, got "
                f"{[m['role'] for m in messages]}"
            )
        extra = _extra_fields(record, ("messages",))
        return ChatPrompt(messages=tuple(messages), answer=answer, extra=extra, where=where)
    if isinstance(record.get("prompt"), str):
        answers = [record[key] for key in _ANSWER_KEYS if record.get(key) is not None]
        if any(not isinstance(a, str) for a in answers):
            raise SFTDataError(f"{where}: 'completion' / 'answer' must be a string")
        messages = ({"role": "user", "content": record["prompt"]},)
        extra = _extra_fields(record, ("prompt", *_ANSWER_KEYS))
        answer = answers[0] if answers else None
        return ChatPrompt(messages=messages, answer=answer, extra=extra, where=where)
    raise SFTDataError(
        f'{where}: expected {{"messages": [...]}} or {{"prompt": str, "answer": str}}; got '
        f"keys {sorted(record)}"
    )


def _extra_fields(record: Mapping[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in used}
