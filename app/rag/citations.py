"""Answers that cite the passages they come from: /ask's `citations: true`.

The reply is held (by the engine's grammar) to JSON `{"citations": [{"source_index": n, "quote": ...}], "answer":
...}` where `source_index` is the number of a passage in the prompt (and its place in `source_documents`, from 1)
and `quote` is one of that passage's own sentences, word for word: the schema gives each passage's sentences as an
enum, so a quote can never be made up, however small the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.llm.base import OutputConstraint
from app.rag.chunking import split_sentences
from app.rag.vector_store import SearchHit

#: Said to the model with the passages; the grammar enforces the shape, this says what to put in it.
CITATIONS_INSTRUCTION = (
    'Reply with JSON: {"citations": [{"source_index": the number of a passage you used, "quote": a sentence copied '
    'from that passage}], "answer": your answer}.'
)
MAX_CITATIONS = 2  # a small model otherwise spends its whole budget quoting
MAX_ANSWER_CHARS = 1000


@dataclass(frozen=True)
class Citation:
    source_index: int  # from 1: the passage's number in the prompt and its place in source_documents
    quote: str  # one of that passage's sentences, verbatim


def _sentences(hit: SearchHit) -> list[str]:
    """What a quote of the passage may be: one of its sentences (or lines), as `split_sentences` cuts them."""
    return list(dict.fromkeys(sentence for _, sentence in split_sentences(hit.chunk.text)))


def citation_constraint(hits: list[SearchHit]) -> OutputConstraint:
    """The JSON Schema of a cited answer over `hits`: each citation a passage's number with one of its sentences."""
    choices = [{"type": "object", "additionalProperties": False, "required": ["source_index", "quote"],
                "properties": {"source_index": {"const": number}, "quote": {"enum": _sentences(hit)}}}
               for number, hit in enumerate(hits, start=1) if hit.chunk.text.strip()]
    citations = {"type": "array", "maxItems": MAX_CITATIONS, "items": {"anyOf": choices}} if choices \
        else {"type": "array", "maxItems": 0}
    # The citations come first: the model copies its evidence, then answers from it (and a budget that runs out
    # in the answer leaves the citations whole).
    return OutputConstraint.json_schema({
        "type": "object", "additionalProperties": False, "required": ["citations", "answer"],
        "properties": {"citations": citations, "answer": {"type": "string", "maxLength": MAX_ANSWER_CHARS}},
    })


def read_cited(text: str, hits: list[SearchHit]) -> tuple[str, tuple[Citation, ...]]:
    """The answer and its citations from the reply. A reply the budget cut keeps what it completed: the citations
    whose quote it finished (each checked against its passage) and the answer so far; one cut before any of that is
    its own text, with no citations."""
    reply = _json_object(text)
    if reply is None:
        return text, ()
    sentences = [_sentences(hit) for hit in hits]
    cited: list[Citation] = []
    for item in reply.get("citations", []):
        number, quote = item.get("source_index"), item.get("quote")
        if isinstance(number, int) and 1 <= number <= len(hits) and quote in sentences[number - 1] \
                and Citation(number, quote) not in cited:  # a quote the budget cut is no sentence: dropped
            cited.append(Citation(number, quote))
    answer = reply.get("answer")
    return (answer if isinstance(answer, str) else ""), tuple(cited)


def _json_object(text: str) -> dict[str, Any] | None:
    """`text` as a JSON object; a text the budget cut is closed first (its open string, arrays and objects), after
    dropping a last member it had only begun."""
    for candidate in (text, *_closed(text)):
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        return value if isinstance(value, dict) else None
    return None


def _closed(text: str) -> list[str]:
    """`text` with what is open at its end closed, whole, and cut back before its last member (at its last comma)."""
    closing, last_comma = _scan(text)
    shortened = text[:last_comma]
    return [text + closing, shortened + _scan(shortened)[0]]


def _scan(text: str) -> tuple[str, int]:
    """What closes `text` (its open string, arrays and objects) and where its last comma outside strings is."""
    openers: list[str] = []
    in_string = escaped = False
    last_comma = 0
    for position, character in enumerate(text):
        if in_string:
            escaped = not escaped and character == "\\"
            in_string = escaped or character != '"'
        elif character == '"':
            in_string = True
        elif character in "[{":
            openers.append(character)
        elif character in "]}" and openers:
            openers.pop()
        elif character == ",":
            last_comma = position
    return ('"' if in_string else "") + "".join("]" if o == "[" else "}" for o in reversed(openers)), last_comma
