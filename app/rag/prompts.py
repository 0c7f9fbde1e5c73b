"""The prompt that puts retrieved chunks in front of the question."""

from __future__ import annotations

from app.llm.base import ChatMessage
from app.rag.vector_store import SearchHit

SYSTEM_PROMPT = (
    "You answer questions about the user's documents. Use only the numbered context passages below. "
    "If they do not contain the answer, say that the documents do not say. "
    "Answer in the language of the question, briefly, and name the source file you used."
)


def context_block(hits: list[SearchHit]) -> str:
    if not hits:
        return "Context:\n(no passages were found)"
    passages = "\n\n".join(
        f"[{number}] (source: {hit.chunk.metadata.get('source', '?')})\n{hit.chunk.text}"
        for number, hit in enumerate(hits, start=1)
    )
    return f"Context:\n{passages}"


def build_messages(question: str, hits: list[SearchHit]) -> list[ChatMessage]:
    return [
        {"role": "system", "content": f"{SYSTEM_PROMPT}\n\n{context_block(hits)}"},
        {"role": "user", "content": question},
    ]


def with_context(messages: list[ChatMessage], hits: list[SearchHit]) -> list[ChatMessage]:
    """A chat conversation with the retrieved passages added to its system message (one is added if none)."""
    if messages and messages[0]["role"] == "system":
        first: ChatMessage = {"role": "system", "content": f"{messages[0]['content']}\n\n{context_block(hits)}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": f"{SYSTEM_PROMPT}\n\n{context_block(hits)}"}, *messages]
