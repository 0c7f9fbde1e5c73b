"""The prompt that puts retrieved chunks in front of the question."""

from __future__ import annotations

from app.llm.base import ChatMessage
from app.rag.vector_store import SearchHit

SYSTEM_PROMPT = (
    "You answer questions about the user's documents. Use only the numbered context passages below. "
    "If they do not contain the answer, say that the documents do not say. "
    "Answer in the language of the question, briefly, and name the source file you used."
)


def build_messages(question: str, hits: list[SearchHit]) -> list[ChatMessage]:
    if hits:
        passages = "\n\n".join(
            f"[{number}] (source: {hit.chunk.metadata.get('source', '?')})\n{hit.chunk.text}"
            for number, hit in enumerate(hits, start=1)
        )
    else:
        passages = "(no passages were found)"
    return [
        {"role": "system", "content": f"{SYSTEM_PROMPT}\n\nContext:\n{passages}"},
        {"role": "user", "content": question},
    ]
