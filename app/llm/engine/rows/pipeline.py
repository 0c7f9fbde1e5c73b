"""A row's per-token step, the same for every row of a batch.

After each forward pass, for each row: its *shapers* change its scores (the vocabulary's logits) in place, its token
is chosen from them (greedy, or sampled with the row's settings: `sampling.sample`), its *recorders* see the
scores it was chosen from, and its *watchers* see the token and may end the row with a finish reason. A row is
built with only the pieces its request asks for, so a free row on the default settings pays for almost none:

- shapers: no end before the first token, the penalties (`penalties`), the output constraint's token mask
  (`grammar`);
- recorders: the token's log-probability and the likeliest others' (`LogprobRecorder`, `logprobs`);
- watchers: the output constraint (complete: `stop`), the token budget (`length`), the repetition guard
  (`repetition`), in that order of precedence.

An end-of-sequence token ends the row (`stop`) before a recorder or watcher sees it; the row's text is then grown
by its detokenizer and cut at its stop strings (`loop._emit`). A new per-row piece is a shaper, a recorder or a
watcher added here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from app.llm.base import FinishReason, Penalties
from app.llm.engine.rows.penalties import penalise

if TYPE_CHECKING:
    import torch


class ScoreShaper(Protocol):
    def shape(self, scores: torch.Tensor, generated: list[int]) -> None:
        """Change one row's `scores` in place before its next token is chosen (`generated`: its tokens so far)."""


class ChoiceRecorder(Protocol):
    def record(self, scores: torch.Tensor, token: int) -> None:
        """See the scores the row's new `token` was chosen from (after its shapers)."""


class TokenWatcher(Protocol):
    def watch(self, token: int, generated: list[int]) -> FinishReason | None:
        """See the row's new `token` (already the last of `generated`); a reason to end the row, or None."""


@dataclass(frozen=True)
class NoEmptyAnswer:
    """An answer never ends before its first token."""

    end_tokens: Sequence[int]

    def shape(self, scores: torch.Tensor, generated: list[int]) -> None:
        if not generated:
            scores[list(self.end_tokens)] = float("-inf")


@dataclass(frozen=True)
class PenaltyShaper:
    penalties: Penalties

    def shape(self, scores: torch.Tensor, generated: list[int]) -> None:
        penalise(scores, generated, self.penalties)


@dataclass(frozen=True)
class TokenBudget:
    max_new_tokens: int

    def watch(self, token: int, generated: list[int]) -> FinishReason | None:
        return "length" if len(generated) >= self.max_new_tokens else None


@dataclass(frozen=True)
class LogprobRecorder:
    """The chosen token's log-probability and the `top` likeliest tokens', from the scores it was chosen from (so a
    constrained row's probabilities are those among the tokens its constraint allowed): (token, logprob, ((token,
    logprob), ...)) appended to `records`."""

    top: int
    records: list[tuple[int, float, tuple[tuple[int, float], ...]]]

    def record(self, scores: torch.Tensor, token: int) -> None:
        logprobs = scores.log_softmax(dim=-1)
        values, ids = logprobs.topk(self.top) if self.top else (logprobs[:0], logprobs[:0].long())
        self.records.append((token, float(logprobs[token]),
                             tuple(zip(ids.tolist(), values.tolist(), strict=True))))


@dataclass(frozen=True)
class RowSteps:
    """One row's shapers, recorders and watchers, in order."""

    shapers: tuple[ScoreShaper, ...]
    watchers: tuple[TokenWatcher, ...]
    recorders: tuple[ChoiceRecorder, ...] = ()

    def shape(self, scores: torch.Tensor, generated: list[int]) -> None:
        for shaper in self.shapers:
            shaper.shape(scores, generated)

    def record(self, scores: torch.Tensor, token: int) -> None:
        for recorder in self.recorders:
            recorder.record(scores, token)

    def watch(self, token: int, generated: list[int]) -> FinishReason | None:
        """Every watcher sees the token (a constraint must advance even on the budget's last token); the first
        reason given, in the watchers' order, ends the row."""
        reasons = [watcher.watch(token, generated) for watcher in self.watchers]
        return next((reason for reason in reasons if reason is not None), None)
