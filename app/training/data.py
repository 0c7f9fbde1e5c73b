"""Reading a JSONL training file and checking every line before any model is loaded (`read_jsonl` is shared
with the classification data of `app.training.classification`).

Each line is one of:
    {"question" | "instruction": str, "context" | "input": str (optional), "answer" | "output": str}
    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
A file with any unusable line is refused as a whole, naming the lines, so a run never stops half-way
because of its data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.llm.base import ChatMessage
from app.training.errors import TrainingDataError
from app.training.formatting import question_messages

_ROLES = ("system", "user", "assistant")
_MAX_REPORTED_LINES = 10
_EXAMPLE_LINE = '{"question": "...", "answer": "..."}'

T = TypeVar("T")


@dataclass(frozen=True)
class TrainingExample:
    """One conversation to learn from; the assistant turns are what the loss covers."""

    messages: list[ChatMessage]
    line_number: int


def load_training_file(path: Path) -> list[TrainingExample]:
    """Every example of the file, or TrainingDataError naming the file's problem or its bad lines."""
    return [TrainingExample(messages, number) for number, messages in read_jsonl(path, parse_record, _EXAMPLE_LINE)]


def read_jsonl(path: Path, parse: Callable[[str], T], example_line: str) -> list[tuple[int, T]]:
    """(line number, parsed record) for every non-blank line, or TrainingDataError naming the file's problem
    or all its bad lines; `parse` raises ValueError saying what is wrong with one line."""
    if not path.exists():
        raise TrainingDataError(f"data file {path} does not exist")
    if not path.is_file():
        raise TrainingDataError(f"data file {path} is not a file")
    records: list[tuple[int, T]] = []
    problems: list[str] = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff").strip()
        except UnicodeDecodeError:
            problems.append(f"line {number}: not UTF-8 text")
            continue
        if not line:
            continue
        try:
            records.append((number, parse(line)))
        except ValueError as error:
            problems.append(f"line {number}: {error}")
    if len(problems) == 1:
        raise TrainingDataError(f"data file {path} has an unusable line, fix or remove it: {problems[0]}")
    if problems:
        shown = problems[:_MAX_REPORTED_LINES]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise TrainingDataError(
            f"data file {path} has {len(problems)} unusable lines, fix or remove them:\n  " + "\n  ".join(shown)
        )
    if not records:
        raise TrainingDataError(f"data file {path} is empty: expected one JSON object per line, like {example_line}")
    return records


def json_object(line: str) -> dict[str, Any]:
    """The JSON object of one line; ValueError when it is not valid JSON or not an object."""
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


def parse_record(line: str) -> list[ChatMessage]:
    """The conversation of one JSONL line; ValueError says, in a few words, what is wrong with it."""
    record = json_object(line)
    if "messages" in record:
        return _chat_messages(record["messages"])
    question = text_field(record, "question", "instruction")
    answer = text_field(record, "answer", "output")
    if question is None and answer is None:
        raise ValueError(
            'expected "question" and "answer" (or "instruction" and "output", or "messages"); '
            f"found {', '.join(sorted(record)) or 'no fields'}"
        )
    if question is None:
        raise ValueError('no question: expected a non-empty "question" or "instruction"')
    if answer is None:
        raise ValueError('no answer: expected a non-empty "answer" or "output"')
    return question_messages(question, text_field(record, "context", "input"), answer)


def text_field(record: dict[str, Any], *names: str) -> str | None:
    """The first of `names` present in the record, stripped; None when absent or blank."""
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if not isinstance(value, str):
                raise ValueError(f'"{name}" must be a string, got {type(value).__name__}')
            return value.strip() or None
    return None


def _chat_messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise ValueError('"messages" must be a non-empty list')
    messages: list[ChatMessage] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"messages[{index}] must be an object with role and content")
        role, content = item.get("role"), item.get("content")
        if role not in _ROLES:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(_ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"messages[{index}].content must be a non-empty string")
        if role == "assistant" and not any(m["role"] == "user" for m in messages):
            raise ValueError(f"messages[{index}] is an assistant turn before any user turn")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("messages has no assistant turn to learn from")
    return messages


def split_examples(
    examples: list[TrainingExample], eval_split: float, seed: int
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(train, eval): a seeded shuffle, then the first `eval_split` of it held out (at least one example)."""
    if eval_split == 0:
        return list(examples), []
    if len(examples) < 2:
        raise TrainingDataError(
            f"only {len(examples)} example: at least 2 are needed to hold one out for evaluation "
            "(or pass --eval_split 0)"
        )
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    held_out = min(max(1, round(len(shuffled) * eval_split)), len(shuffled) - 1)
    return shuffled[held_out:], shuffled[:held_out]
