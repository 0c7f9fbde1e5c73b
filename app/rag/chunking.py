"""Split text into overlapping chunks on sentence boundaries, Chinese and English alike."""

from __future__ import annotations

import re
from dataclasses import dataclass

# A sentence ends after Chinese 。！？； (no space follows them), after English .!?; followed by
# whitespace, or at a blank line / line break.
_SENTENCE_END = re.compile(r"(?<=[。！？；])|(?<=[.!?;])\s+|\n\s*\n|\n")


@dataclass(frozen=True)
class Chunk:
    text: str
    index: int
    start: int  # character offset of the chunk in the source text


def split_sentences(text: str) -> list[tuple[int, str]]:
    """(offset, sentence) pairs; whitespace-only pieces are dropped."""
    pieces, position = [], 0
    for match in _SENTENCE_END.finditer(text):
        if match.end() == 0:
            continue
        piece = text[position : match.start()] if match.group() else text[position : match.end()]
        if piece.strip():
            pieces.append((position, piece))
        position = match.end()
    if text[position:].strip():
        pieces.append((position, text[position:]))
    return pieces


def _hard_split(offset: int, sentence: str, size: int) -> list[tuple[int, str]]:
    """A sentence longer than a chunk (a table row, a wall of CJK without punctuation) is cut by length."""
    return [(offset + i, sentence[i : i + size]) for i in range(0, len(sentence), size)]


def chunk_text(text: str, chunk_size: int, overlap: int) -> list[Chunk]:
    """Pack whole sentences into chunks of at most `chunk_size` characters; each chunk repeats the tail
    sentences of the previous one, up to `overlap` characters, so an answer spanning a boundary is kept."""
    sentences: list[tuple[int, str]] = []
    for offset, sentence in split_sentences(text):
        sentence_text = sentence.strip()
        offset += len(sentence) - len(sentence.lstrip())
        sentences.extend(_hard_split(offset, sentence_text, chunk_size))
    chunks: list[Chunk] = []
    current: list[tuple[int, str]] = []
    for offset, sentence in sentences:
        if current and _joined_length(current + [(offset, sentence)]) > chunk_size:
            chunks.append(_make_chunk(current, len(chunks)))
            current = _tail_within(current, overlap, chunk_size - len(sentence) - 1)
        current.append((offset, sentence))
    if current:
        chunks.append(_make_chunk(current, len(chunks)))
    return chunks


def _joined_length(sentences: list[tuple[int, str]]) -> int:
    return sum(len(s) for _, s in sentences) + max(len(sentences) - 1, 0)


def _tail_within(sentences: list[tuple[int, str]], overlap: int, room: int) -> list[tuple[int, str]]:
    tail: list[tuple[int, str]] = []
    for item in reversed(sentences):
        if _joined_length([item, *tail]) > min(overlap, room):
            break
        tail.insert(0, item)
    return tail


def _make_chunk(sentences: list[tuple[int, str]], index: int) -> Chunk:
    # CJK sentences are joined without a space, as they are written.
    parts = [sentences[0][1]]
    for _, sentence in sentences[1:]:
        parts.append(sentence if _is_cjk(parts[-1][-1:]) else " " + sentence)
    return Chunk(text="".join(parts), index=index, start=sentences[0][0])


def _is_cjk(character: str) -> bool:
    return bool(character) and ("\u3000" <= character <= "\u9fff" or "\uff00" <= character <= "\uffef")
