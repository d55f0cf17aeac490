"""Chat data for supervised fine-tuning: read, validate, tokenise with the chat template, mask.

`load_sft_dataset(path_or_name, tokenizer, max_length)` reads records with the `datasets` library
(a `.jsonl`/`.json` file line by line, a `.parquet` file, or a dataset directory / hub name) in one
of two forms:

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
    {"prompt": "...", "completion": "..."}      (read as one user turn and one assistant turn)

Each example is the tokenizer's chat template rendering of the whole conversation, tokenised once.
The loss mask is 1 on what the model must generate for each assistant turn (the reply and its
end-of-turn token) and 0 on system, user, tool and template tokens. A template with
`{% generation %}` blocks marks those tokens itself (`return_assistant_tokens_mask=True`); for one
without (most shipped templates), each turn is found by rendering the conversation up to it, with
and without the generation prompt (`rollouts.data._chat_masks` has the rule). `mask_mode` forces
one way; `chat_template_kwargs` reach the template (`{"enable_thinking": False}`, say).

Bad input raises `SFTDataError` naming the file and the line (JSONL; "row" for other formats) and
what was expected; `skip_bad_lines=True` skips such records instead and counts them. Examples
longer than `max_length` tokens are truncated (`overlong="truncate"`, keeping the first
`max_length` tokens) or dropped (`overlong="drop"`); a truncated example left with no assistant
token is dropped too. All counts are on the returned `SFTDataset`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollouts.data._chat_masks import MASK_MODES, ChatMasker, ChatMaskError

__all__ = [
    "MASK_MODES",
    "OVERLONG_POLICIES",
    "ROLES",
    "SFTDataError",
    "SFTDataset",
    "TokenizedExample",
    "load_sft_dataset",
    "tokenize_records",
]

ROLES = ("system", "user", "assistant", "tool")
OVERLONG_POLICIES = ("truncate", "drop")
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)
_BAD_LINES_SHOWN_MAX = 5  # how many skipped-line messages a warning quotes

_log = logging.getLogger(__name__)


class SFTDataError(ValueError):
    """A record of an SFT data file is unusable; the message names the file and the line."""


@dataclass(frozen=True)
class TokenizedExample:
    """One conversation as token ids [T] and per-token loss weights [T] (1 = assistant token).

    Not shifted: the batch collators shift, so `labels[t] = input_ids[t + 1]`.
    """

    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    where: str  # "file.jsonl line 12", for messages about this example

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.loss_mask), "ids and mask must have one length"


@dataclass(frozen=True)
class SFTDataset:
    """Tokenised examples plus what was done to the input on the way."""

    examples: tuple[TokenizedExample, ...]
    pad_token_id: int
    source: str
    max_length: int
    num_records: int  # records read, bad ones included
    num_truncated: int = 0
    num_dropped_overlong: int = 0  # dropped for length ("drop", or nothing left to learn)
    num_skipped_bad: int = 0
    skipped_messages: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        """One line of counts, for logs."""
        return (
            f"{self.source}: {len(self)} examples from {self.num_records} records "
            f"({self.num_truncated} truncated, {self.num_dropped_overlong} dropped as longer than "
            f"{self.max_length} tokens, {self.num_skipped_bad} bad records skipped)"
        )


def load_sft_dataset(
    path_or_name: str | Path,
    tokenizer: Any,
    max_length: int,
    *,
    overlong: str = "truncate",
    skip_bad_lines: bool = False,
    split: str = "train",
    mask_mode: str = "auto",
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> SFTDataset:
    """Read, validate and tokenise chat examples; see the module docstring for the rules."""
    records, source, unit = _read_records(path_or_name, split)
    return tokenize_records(
        records,
        tokenizer,
        max_length,
        overlong=overlong,
        skip_bad_lines=skip_bad_lines,
        source=source,
        unit=unit,
        mask_mode=mask_mode,
        chat_template_kwargs=chat_template_kwargs,
    )


def tokenize_records(
    records: Iterable[Any],
    tokenizer: Any,
    max_length: int,
    *,
    overlong: str = "truncate",
    skip_bad_lines: bool = False,
    source: str = "<records>",
    unit: str = "record",
    mask_mode: str = "auto",
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> SFTDataset:
    """Tokenise in-memory records (dicts, or JSON strings) with the same checks as a file.

    `mask_mode`: "auto" (the template's `{% generation %}` blocks when it has them, incremental
    rendering otherwise), "generation_tags" or "incremental".
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong={overlong!r}; must be one of {OVERLONG_POLICIES}")
    if max_length < 2:
        raise ValueError(f"max_length={max_length}; must be >= 2 (an input and its target)")
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        raise ValueError("the tokenizer has no pad_token; set tokenizer.pad_token first")
    masker = ChatMasker.create(tokenizer, mask_mode, chat_template_kwargs)
    examples: list[TokenizedExample] = []
    skipped: list[str] = []
    num_records = num_truncated = num_dropped = 0
    for index, record in enumerate(records):
        num_records += 1
        where = f"{source} {unit} {index + 1}"
        if isinstance(record, str) and not record.strip():
            num_records -= 1  # a blank line of a JSONL file is not a record
            continue
        try:
            ids, mask = _tokenize_one(_messages_of(record, where), masker, where)
        except SFTDataError as error:
            if not skip_bad_lines:
                raise
            skipped.append(str(error))
            continue
        if len(ids) > max_length:
            if overlong == "drop" or not any(mask[:max_length]):
                num_dropped += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            num_truncated += 1
        examples.append(TokenizedExample(tuple(ids), tuple(mask), where))
    if skipped:
        shown = "; ".join(skipped[:_BAD_LINES_SHOWN_MAX])
        _log.warning("%s: skipped %d bad %s(s): %s", source, len(skipped), unit, shown)
    if not examples:
        raise SFTDataError(
            f"{source}: no usable example ({num_records} {unit}(s) read, {len(skipped)} bad, "
            f"{num_dropped} dropped as longer than max_length={max_length}); expected at least one "
            "chat example with an assistant reply"
        )
    return SFTDataset(
        examples=tuple(examples),
        pad_token_id=int(pad_token_id),
        source=source,
        max_length=max_length,
        num_records=num_records,
        num_truncated=num_truncated,
        num_dropped_overlong=num_dropped,
        num_skipped_bad=len(skipped),
        skipped_messages=tuple(skipped),
    )


# -- reading -------------------------------------------------------------------------------------


def _read_records(path_or_name: str | Path, split: str) -> tuple[Sequence[Any], str, str]:
    """(records, source name, unit): JSON lines stay raw strings so a bad one names its line."""
    import datasets

    path = Path(path_or_name)
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the files are small; a bar per load is noise
    try:
        if path.is_file():
            if path.stat().st_size == 0:
                raise SFTDataError(f"{path}: the file is empty; expected chat examples")
            suffix = path.suffix.lower()
            if suffix in _JSON_SUFFIXES:
                # The "text" builder yields one row per line, blank lines included, so row i is
                # line i + 1 and each line is parsed (and reported) on its own.
                rows = datasets.load_dataset(
                    "text", data_files=str(path), split="train", keep_in_memory=True
                )
                return rows["text"], str(path), "line"
            if suffix in _PARQUET_SUFFIXES:
                rows = datasets.load_dataset(
                    "parquet", data_files=str(path), split="train", keep_in_memory=True
                )
                return rows, str(path), "row"
            raise SFTDataError(
                f"{path}: unknown data file type {suffix!r}; expected one of "
                f"{[*_JSON_SUFFIXES, *_PARQUET_SUFFIXES]}"
            )
        # A name with a data-file suffix is a file the user meant, never a hub dataset id: say
        # it is missing at once rather than after a hub lookup times out.
        data_suffix = path.suffix.lower() in (*_JSON_SUFFIXES, *_PARQUET_SUFFIXES)
        looks_local = path.exists() or str(path_or_name).startswith((".", "/", "~")) or data_suffix
        if looks_local and not path.is_dir():
            raise SFTDataError(
                f"{path}: no such data file or dataset directory (looked in {Path.cwd()})"
            )
        if path.is_dir() and (path / "dataset_dict.json").is_file():  # save_to_disk, with splits
            return datasets.load_from_disk(str(path))[split], f"{path}[{split}]", "row"
        if path.is_dir() and (path / "state.json").is_file():  # save_to_disk, one split
            return datasets.load_from_disk(str(path)), str(path), "row"
        rows = datasets.load_dataset(str(path_or_name), split=split)
        return rows, f"{path_or_name}[{split}]", "row"
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _messages_of(record: Any, where: str) -> list[dict[str, str]]:
    """Validate one record; return its messages (prompt/completion become two turns)."""
    record = _parsed_record(record, where)
    if record.get("messages") is not None:
        return _checked_messages(record["messages"], where)
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        return _checked_messages(messages, where)
    raise SFTDataError(
        f"{where}: missing 'messages' key (expected {{\"messages\": [...]}} or "
        f'{{"prompt": str, "completion": str}}); got keys {sorted(record)}'
    )


def _parsed_record(record: Any, where: str) -> Mapping[str, Any]:
    """A record as a mapping: a JSON line is parsed; anything but an object is refused."""
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as error:
            raise SFTDataError(f"{where}: not valid JSON ({error}): {record[:80]!r}") from None
    if not isinstance(record, Mapping):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _checked_messages(
    messages: Any, where: str, *, need_assistant: bool = True
) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{where}: 'messages' must be a non-empty list, got {messages!r:.80}")
    checked = []
    for turn, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise SFTDataError(f"{where}: messages[{turn}] must be an object, got {message!r:.80}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise SFTDataError(
                f"{where}: messages[{turn}] has unknown role {role!r}; expected one of {ROLES}"
            )
        if not isinstance(content, str):
            raise SFTDataError(
                f"{where}: messages[{turn}].content must be a string, got {type(content).__name__}"
            )
        checked.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in checked):
        raise SFTDataError(f"{where}: no assistant message, so no token to learn from")
    return checked


def _tokenize_one(
    messages: list[dict[str, str]], masker: ChatMasker, where: str
) -> tuple[list[int], list[int]]:
    try:
        ids, mask = masker.tokenize(messages)
    except ChatMaskError as error:
        raise SFTDataError(f"{where}: {error}") from None
    if not any(mask):
        why = (
            "a chat template without {% generation %} around assistant replies"
            if masker.mode == "generation_tags"
            else "a chat template that writes nothing for them"
        )
        raise SFTDataError(f"{where}: no assistant token (empty assistant content, or {why})")
    return ids, mask
