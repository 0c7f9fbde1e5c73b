"""What crosses from a request to the generation engine: the resolved adapter choice and the job.

Nothing here imports torch, so the request side (backends, the adapter catalogue, tests) can build and read
jobs without loading the model's libraries.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.errors import AppError
from app.llm.base import FinishReason, GenerationParams

if TYPE_CHECKING:
    from app.llm.engine.rows.grammar import ConstrainedRow

BASE_KEY = "__base__"
#: PEFT names of classifier adapters start with this; generation names start with a letter or digit.
CLASSIFIER_PREFIX = "_cls_"


@dataclass(frozen=True)
class AdapterChoice:
    """A request's adapters once resolved against the loaded ones: the base model alone (no parts), one adapter
    at weight 1, or a weighted mix. Built once when the request is resolved; the engine reads it, never a text."""

    parts: tuple[tuple[str, float], ...] = ()

    @classmethod
    def single(cls, name: str) -> AdapterChoice:
        return cls(((name, 1.0),))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(weight for _, weight in self.parts)

    @property
    def is_base(self) -> bool:
        return not self.parts

    @property
    def is_mix(self) -> bool:
        return len(self.parts) > 1 or (len(self.parts) == 1 and self.parts[0][1] != 1.0)

    @property
    def key(self) -> str:
        """A stable text for logs and responses: `__base__`, `sql`, or `sql*0.7+code*0.3` (names sorted)."""
        if self.is_base:
            return BASE_KEY
        if not self.is_mix:
            return self.parts[0][0]
        return "+".join(f"{name}*{weight:g}" for name, weight in sorted(self.parts))

    @property
    def peft_name(self) -> str:
        """The adapter's name inside PEFT. A mix gets a digest: PEFT names become module keys, which may not
        contain the '.' of a weight."""
        if not self.is_mix:
            return self.key
        return "mix_" + hashlib.sha1(self.key.encode()).hexdigest()[:12]


BASE_MODEL = AdapterChoice()


@dataclass
class GenerationJob:
    """One request's generation; the engine fills the output fields and resolves `future`."""

    input_ids: list[int]
    params: GenerationParams
    adapter: AdapterChoice
    on_text: Callable[[str], None] | None = None
    constraint: ConstrainedRow | None = None  # params.constraint compiled for this row, which advances it
    future: concurrent.futures.Future[GenerationJob] = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    #: with params.logprobs: per generated token, (token, logprob, ((token, logprob) of the likeliest, ...))
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    error: AppError | None = None  # this row failed alone; the batch's other rows go on

    def resolve(self) -> None:
        """Hand the job back; its future may already be cancelled when the caller went away."""
        _settle(self.future, self)

    def fail(self, error: BaseException) -> None:
        _settle(self.future, error=error)


@dataclass(eq=False)  # compared by identity: the engine removes this very job from its queue
class PredictionJob:
    """One classification request: its texts' token ids, run with exactly the classifier's adapter (its reserved
    PEFT name). The engine runs at most `batch_size` rows per forward pass, between generation batches, and
    appends each row's output (the final hidden state at its last token) in order; `future` then gets them all."""

    adapter: str  # the classifier's PEFT adapter name (reserved, never a generation adapter's)
    rows: list[list[int]]
    batch_size: int
    future: concurrent.futures.Future[list[object]] = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    outputs: list[object] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.rows) - len(self.outputs)

    def resolve(self) -> None:
        _settle(self.future, self.outputs)

    def fail(self, error: BaseException) -> None:
        _settle(self.future, error=error)


def _settle(future: concurrent.futures.Future[Any], result: object = None, error: BaseException | None = None) -> None:
    """Give `future` its result or error unless it has one: the caller may have cancelled it, and a closing engine
    whose thread is stuck fails its rows from another thread, which the engine thread may race."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
