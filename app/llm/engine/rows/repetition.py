"""A row that has begun to repeat itself is stopped.

A small model asked something its adapter and documents do not cover (SmolLM2 on "你好，请介绍一下你自己") can fall
into a loop and repeat one phrase until MAX_NEW_TOKENS: 512 tokens and two minutes of a 2-core CPU, spent on text
nobody reads. A row whose last tokens are one span of at least `min_span` tokens `repeats` times running is
stopped (finish reason `repetition`, with a notice saying so). Checked after every token over the spans that
could have just completed a repetition, so it costs a few list comparisons a token.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.llm.base import FinishReason

_MAX_SPAN = 64  # longer loops exist, but a span this long repeated is rare and costs at most 3 x 64 tokens more


@dataclass(frozen=True)
class RepetitionGuard:
    min_span: int  # REPETITION_MIN_SPAN: tokens in the shortest span that counts
    repeats: int  # REPETITION_REPEATS: how many times running; 0 turns the guard off

    def watch(self, token: int, generated: list[int]) -> FinishReason | None:
        """A row's watcher (`pipeline.TokenWatcher`)."""
        return "repetition" if self.repeating(generated) else None

    def repeating(self, tokens: list[int]) -> bool:
        """Whether `tokens` ends with one span of `min_span` to 64 tokens, `repeats` times running."""
        if self.repeats < 2:
            return False
        for span in range(self.min_span, min(_MAX_SPAN, len(tokens) // self.repeats) + 1):
            last = tokens[-span:]
            if all(tokens[-span * (k + 1) : len(tokens) - span * k] == last for k in range(1, self.repeats)):
                return True
        return False
