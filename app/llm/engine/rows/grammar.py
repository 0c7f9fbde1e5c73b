"""Rows held to an output constraint (`OutputConstraint`: any JSON object, or JSON valid for a schema).

llguidance (the grammar engine llama.cpp and vLLM use) compiles the constraint into a matcher over the tokenizer's
vocabulary; before each of the row's tokens is chosen, the matcher's mask sets the scores of every token that would
make the text invalid to -inf, and the chosen token advances it. So greedy, sampled and penalised rows alike
produce valid JSON, and a row ends (`stop`) once the JSON is complete. The JSON is written on one line, `", "`
between items and `": "` after keys (OpenAI's own layout): with llguidance's default of any whitespace anywhere,
SmolLM2 spent tokens on blank lines and indentation, and a small model can loop there until its budget. A budget
that runs out inside the structure ends the row with `length` and the JSON so far.

The masking is written here rather than taken from llguidance's `torch` helper, which is `torch.compile`d (its
first call took 31 s on this CPU): a row's mask is a few thousand bytes, unpacked and applied in microseconds.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import numpy as np

from app.errors import InvalidOutputConstraintError, NotSupportedError, OutputConstraintFailedError
from app.llm.base import FinishReason, OutputConstraint
from app.llm.tools import MAX_CALLS_PER_REPLY, TOOL_CALL_CLOSE, TOOL_CALL_OPEN

if TYPE_CHECKING:
    import torch
    from llguidance._lib import JsonCompileOptions
    from transformers import PreTrainedTokenizerBase

#: How the JSON is laid out (a schema's own `x-guidance` options may change it).
JSON_LAYOUT: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: Distinct constraints whose compiled matcher is kept (a request's schema is usually one of a few, sent again).
COMPILED_CACHE_SIZE = 128


class ConstraintCompiler:
    """Compiles output constraints for one tokenizer, checking them before any generation.

    llguidance's view of the tokenizer is built at the first constrained request (0.3 s for SmolLM2's 49,152
    tokens) and kept; each distinct constraint is compiled once (a few milliseconds) and every row gets its own
    copy of the compiled matcher (microseconds)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, end_tokens: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._end_tokens = sorted(end_tokens)
        self._lock = threading.Lock()
        self._vocabulary: llguidance.LLTokenizer | None = None
        self._compiled = functools.lru_cache(maxsize=COMPILED_CACHE_SIZE)(self._compile)

    def row(self, constraint: OutputConstraint) -> ConstrainedRow:
        """A new row's matcher for `constraint`. InvalidOutputConstraintError (400) naming the problem when the
        schema cannot be compiled. Blocking for the first request (the tokenizer's set-up): call it off the event
        loop."""
        return ConstrainedRow(self._compiled(constraint).deep_copy())

    def token_bytes(self, token: int) -> bytes:
        """`token`'s exact bytes (byte-level tokenizers split UTF-8 characters over tokens)."""
        return self._llguidance_tokenizer().decode_bytes([token])

    def _compile(self, constraint: OutputConstraint) -> llguidance.LLMatcher:
        try:
            if constraint.kind == "tool_calls":
                grammar = llguidance.LLMatcher.grammar_from_lark(_tool_calls_lark(constraint))
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(constraint.schema_object, defaults=JSON_LAYOUT)
        except ValueError as error:
            raise InvalidOutputConstraintError(f"the JSON schema cannot be used: {error}") from None
        matcher = llguidance.LLMatcher(self._llguidance_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidOutputConstraintError(f"the JSON schema cannot be used: {matcher.get_error()}")
        return matcher

    def _llguidance_tokenizer(self) -> llguidance.LLTokenizer:
        from transformers import PreTrainedTokenizerFast

        with self._lock:
            if self._vocabulary is None:
                if not isinstance(self._tokenizer, PreTrainedTokenizerFast):  # llguidance reads the Rust tokenizer
                    raise NotSupportedError(
                        "structured output needs the model's fast (tokenizer.json) tokenizer, which this model lacks"
                    )
                self._vocabulary = llguidance.hf.from_tokenizer(self._tokenizer, eos_token=self._end_tokens)
            return self._vocabulary


def _tool_calls_lark(constraint: OutputConstraint) -> str:
    """A reply of tool calls in `app.llm.tools`' format, each call's JSON valid for the constraint's schema (laid
    out as JSON_LAYOUT says): one call, or up to MAX_CALLS_PER_REPLY on lines of their own."""
    schema = {**constraint.schema_object, "x-guidance": JSON_LAYOUT}
    more = f' ("\\n" call){{0,{MAX_CALLS_PER_REPLY - 1}}}' if constraint.many else ""
    return (f"start: call{more}\n"
            f"call: {json.dumps(TOOL_CALL_OPEN)} %json {json.dumps(schema)} {json.dumps(TOOL_CALL_CLOSE)}\n")


class ConstrainedRow:
    """One row's matcher: a shaper (its mask) and a watcher (the token advances it) of the row's step
    (`pipeline.RowSteps`). Used by the engine thread only, once the row is submitted."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def shape(self, scores: torch.Tensor, generated: list[int]) -> None:
        import torch

        bits = self._matcher.compute_bitmask()
        self._raise_on_error()
        allowed = torch.from_numpy(np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little"))
        known = min(len(allowed), scores.shape[-1])
        scores[:known].masked_fill_(allowed[:known] == 0, float("-inf"))
        scores[known:] = float("-inf")  # the model's padding rows of the vocabulary: never valid text

    def watch(self, token: int, generated: list[int]) -> FinishReason | None:
        self._matcher.consume_token(token)
        self._raise_on_error()
        return "stop" if self._matcher.is_stopped() else None

    def _raise_on_error(self) -> None:
        if self._matcher.is_error():
            raise OutputConstraintFailedError(
                f"the reply could not be held to its format: {self._matcher.get_error()}; other requests are "
                "unaffected"
            )
