"""Split text into overlapping chunks on sentence boundaries, Chinese and English alike."""

from __future__ import annotations

import re
from dataclasses import dataclass

# A sentence ends after a run of Chinese 。！？； and the closing quotes or brackets that follow it
# (no space follows them in Chinese), after English .!?; followed by whitespace, or at a line break.
_CJK_END = "。！？；"
_CJK_CLOSERS = "”’」』）》"
_NOT_FOLLOWED = rf"(?![{_CJK_END}{_CJK_CLOSERS}])"
_SENTENCE_END = re.compile(
    rf"(?<=[{_CJK_END}]){_NOT_FOLLOWED}|(?<=[{_CJK_END}][{_CJK_CLOSERS}]){_NOT_FOLLOWED}|(?<=[.!?;])\s+|\n"
)


@dataclass(frozen=True)
class Chunk:
    text: str
    index: int
    start: int  # character offset of the chunk in the source text


@dataclass(frozen=True)
class _Sentence:
    start: int
    text: str
    joiner: str  # what goes between the previous sentence and this one: "\n", " " or "" (CJK)


def split_sentences(text: str) -> list[tuple[int, str]]:
    """(offset, sentence) pairs, stripped; whitespace-only pieces are dropped."""
    pieces: list[tuple[int, str]] = []
    position = 0
    for match in _SENTENCE_END.finditer(text):
        if match.end() == 0:
            continue
        _append_stripped(pieces, position, text[position : match.start()])
        position = match.end()
    _append_stripped(pieces, position, text[position:])
    return pieces


def _append_stripped(pieces: list[tuple[int, str]], offset: int, piece: str) -> None:
    stripped = piece.strip()
    if stripped:
        pieces.append((offset + len(piece) - len(piece.lstrip()), stripped))


def _sentences(text: str, max_length: int) -> list[_Sentence]:
    sentences: list[_Sentence] = []
    previous_end = 0
    for offset, sentence in split_sentences(text):
        # A sentence longer than a chunk (a table row, CJK without punctuation) is cut by length.
        for cut in range(0, len(sentence), max_length):
            start = offset + cut
            gap = text[previous_end:start]
            joiner = "\n" if "\n" in gap else ("" if not gap or _is_cjk(text[start - 1 : start]) else " ")
            sentences.append(_Sentence(start, sentence[cut : cut + max_length], joiner))
            previous_end = start + len(sentence[cut : cut + max_length])
    return sentences


def chunk_text(text: str, chunk_size: int, overlap: int) -> list[Chunk]:
    """Pack whole sentences into chunks of at most `chunk_size` characters; each chunk repeats the tail
    sentences of the previous one, up to `overlap` characters, so an answer spanning a boundary is kept."""
    chunks: list[Chunk] = []
    current: list[_Sentence] = []
    for sentence in _sentences(text, chunk_size):
        if current and _length(current) + 1 + len(sentence.text) > chunk_size:
            chunks.append(_make_chunk(current, len(chunks)))
            current = _tail_within(current, min(overlap, chunk_size - len(sentence.text) - 1))
        current.append(sentence)
    if current:
        chunks.append(_make_chunk(current, len(chunks)))
    return chunks


def _length(sentences: list[_Sentence]) -> int:
    return len(_join(sentences))


def _tail_within(sentences: list[_Sentence], limit: int) -> list[_Sentence]:
    tail: list[_Sentence] = []
    for sentence in reversed(sentences):
        if _length([sentence, *tail]) > limit:
            break
        tail.insert(0, sentence)
    return tail


def _join(sentences: list[_Sentence]) -> str:
    return sentences[0].text + "".join(s.joiner + s.text for s in sentences[1:]) if sentences else ""


def _make_chunk(sentences: list[_Sentence], index: int) -> Chunk:
    return Chunk(text=_join(sentences), index=index, start=sentences[0].start)


def _is_cjk(character: str) -> bool:
    return bool(character) and ("\u3000" <= character <= "\u9fff" or "\uff00" <= character <= "\uffef")
