"""A row's text, token by token, in complete characters only.

Byte-level tokenizers (SmolLM2's, Qwen's) split a Chinese character or an emoji over several tokens, so the text
of the tokens so far can end in half a character, which decodes to U+FFFD. Like vLLM's incremental detokenizer,
this decodes a short window (the tokens since the last complete text, with a few before them for context) and
takes its new text only once it no longer ends in U+FFFD; at the end of a budget an unfinished character is
dropped, never shown. Bytes that can never become a character (a model may emit any byte token) are dropped too,
so no U+FFFD reaches a caller. Each step decodes a few tokens, not the whole answer again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """The complete text of one row's generated tokens, grown one token at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._prefix_offset = 0  # tokens before this are context only: their text is already taken
        self._read_offset = 0  # tokens before this have given their text
        self.text = ""

    def add(self, token: int) -> str:
        """Take one token; return the complete text it finished (often "", while a character is incomplete)."""
        self._tokens.append(token)
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        window = self._decode(self._tokens[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT):
            return ""  # nothing new yet, or half a character: wait for the bytes that finish it
        new = window[len(prefix) :].replace(REPLACEMENT, "")
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        self.text += new
        return new

    def _decode(self, tokens: list[int]) -> str:
        # One sequence decodes to a str; transformers types every decode as `str | list[str]` (no overload).
        return self._tokenizer.decode(tokens, skip_special_tokens=True)  # type: ignore[return-value]
