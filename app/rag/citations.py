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


def citation_constraint(hits: list[SearchHit]) -> OutputConstraint:
    """The JSON Schema of a cited answer over `hits`: each citation a passage's number with one of its sentences."""
    choices = [{"type": "object", "additionalProperties": False, "required": ["source_index", "quote"],
                "properties": {"source_index": {"const": number},
                               "quote": {"enum": list(dict.fromkeys(s for _, s in split_sentences(hit.chunk.text)))}}}
               for number, hit in enumerate(hits, start=1) if hit.chunk.text.strip()]
    citations = {"type": "array", "maxItems": MAX_CITATIONS, "items": {"anyOf": choices}} if choices \
        else {"type": "array", "maxItems": 0}
    # The citations come first: the model copies its evidence, then answers from it (and a budget that runs out
    # in the answer leaves the citations whole).
    return OutputConstraint.json_schema({
        "type": "object", "additionalProperties": False, "required": ["citations", "answer"],
        "properties": {"citations": citations, "answer": {"type": "string", "maxLength": MAX_ANSWER_CHARS}},
    })


def read_cited(text: str) -> tuple[str, tuple[Citation, ...]]:
    """The answer and its citations from the reply. A reply the budget cut inside its answer keeps its citations and
    the answer so far; one cut before them is its own text, with no citations."""
    reply = _json_object(text)
    if reply is None:
        return text, ()
    cited = tuple(dict.fromkeys(Citation(int(item["source_index"]), str(item["quote"]))
                                for item in reply.get("citations", [])))
    return str(reply.get("answer", "")), cited


def _json_object(text: str) -> dict[str, Any] | None:
    """`text` as a JSON object, or as one once the string and object the budget cut are closed."""
    for ending in ("", '"}', "}"):
        try:
            value = json.loads(text + ending)
        except json.JSONDecodeError:
            continue
        return value if isinstance(value, dict) else None
    return None
