"""Batched generation on one worker thread.

Every use of the model happens on this thread: generation batches and, between them, control tasks such as
loading or unloading an adapter. So an adapter is never changed under a running forward pass, and no lock
is held across a generation. Requests waiting together are decoded as one batch, each row with its own
adapter (PEFT `adapter_names=`), sampling settings, token budget, stop strings and streaming callback.

Classification predictions (`PredictionJob`) run here too, one forward pass of at most a request's batch size per
turn, rows of every queued request on the same classifier sharing it. When generations and predictions both wait,
turns alternate, so neither starves the other. During a generation batch, one prediction turn may run between two
decode steps (then the batch's adapter arrangement is put back before its next step), while predictions have taken
no more time than the batch's own steps: a waiting prediction starts within a step or two, and a running
generation keeps at least half of the engine's time.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from app.errors import AppError, NumericalFailureError
from app.llm.jobs import GenerationJob, PredictionJob

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    # What AutoModelForCausalLM loads: a PreTrainedModel with GenerationMixin's `generate` (transformers
    # declares this type for type checkers only; PreTrainedModel alone has no `generate`).
    from transformers.models.auto.modeling_auto import _BaseModelWithGenerate as CausalLM

    #: The model that serves: the causal LM, or PEFT's wrapper around it once an adapter is attached.
    ServedModel = CausalLM | PeftModel

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Runs one forward pass for a classifier (its PEFT adapter name) over token-id rows: one output per row.
Classify = Callable[[str, list[list[int]]], Sequence[object]]
#: A prediction turn: slices (job, first row, row count) of queued jobs on one classifier.
_PredictionTurn = list[tuple[PredictionJob, int, int]]


@dataclass(frozen=True)
class PreparedBatch:
    """What `prepare` hands back: the model to run, the rows that can run (the others already failed),
    each row's PEFT adapter name (None when every row runs the same weights), and how to put the batch's
    arrangement back after a prediction ran between its decode steps (None: nothing may run inside the batch)."""

    model: ServedModel
    jobs: list[GenerationJob]
    adapter_names: list[str] | None
    rearrange: Callable[[], object] | None = None


class GenerationEngine:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prepare: Callable[[list[GenerationJob]], PreparedBatch],
        *,
        max_batch_size: int,
        batch_window_seconds: float,
        classify: Classify | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._prepare = prepare
        self._classify = classify
        self._predictions: deque[PredictionJob] = deque()
        self._last_turn: Literal["generate", "predict"] = "predict"
        self._max_batch_size = max_batch_size
        self._batch_window = batch_window_seconds
        self._jobs: deque[GenerationJob] = deque()
        self._controls: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._eos_ids = _eos_token_ids(tokenizer)
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()

    def submit(self, job: GenerationJob) -> None:
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
            self._jobs.append(job)
            self._wakeup.notify()

    def submit_prediction(self, job: PredictionJob) -> None:
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
            if self._classify is None:
                raise RuntimeError("this engine runs no classification")
            self._predictions.append(job)
            self._wakeup.notify()

    @property
    def pending_predictions(self) -> int:
        """Prediction requests queued or running (not yet answered)."""
        with self._wakeup:
            return len(self._predictions)

    def call(self, function: Callable[[], T]) -> T:
        """Run `function` on the engine thread between batches and return its result (blocking)."""
        if threading.current_thread() is self._thread:
            return function()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._wakeup:
            self._controls.append((function, future))
            self._wakeup.notify()
        return future.result()

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=60)

    def _next_work(
        self,
    ) -> tuple[Callable[[], Any], concurrent.futures.Future[Any]] | list[GenerationJob] | _PredictionTurn | None:
        with self._wakeup:
            while not (self._jobs or self._controls or self._predictions or self._closed):
                self._wakeup.wait()
            if self._closed:
                for job in self._jobs:
                    job.fail(RuntimeError("the server is shutting down"))
                for prediction in self._predictions:
                    prediction.fail(RuntimeError("the server is shutting down"))
                return None
            if self._controls:
                return self._controls.popleft()
            if self._predictions and (not self._jobs or self._last_turn == "generate"):
                turn = self._prediction_turn()
                if turn:
                    self._last_turn = "predict"
                    return turn
                if not self._jobs:
                    return []
            self._last_turn = "generate"
            if len(self._jobs) < self._max_batch_size and self._batch_window > 0:
                # Let requests that arrive together share a batch.
                self._wakeup.wait(timeout=self._batch_window)
            count = min(self._max_batch_size, len(self._jobs))
            return [self._jobs.popleft() for _ in range(count)]

    def _run(self) -> None:
        while True:
            work = self._next_work()
            if work is None:
                return
            if isinstance(work, tuple):
                function, future = work
                try:
                    future.set_result(function())
                except BaseException as error:  # handed to the caller, who raises it
                    future.set_exception(error)
                continue
            if work and isinstance(work[0], tuple):
                self._run_predictions(work)  # type: ignore[arg-type]
                continue
            jobs = [job for job in work if isinstance(job, GenerationJob) and not self._skip_cancelled(job)]
            if jobs:
                self._run_batch(jobs)

    def _prediction_turn(self) -> _PredictionTurn:
        """Under the lock: the next forward's rows, FIFO from the queued jobs on the first job's classifier, at
        most that job's batch size. Cancelled jobs leave the queue."""
        for job in [job for job in self._predictions if job.cancelled.is_set()]:
            self._predictions.remove(job)
            job.future.cancel()
        if not self._predictions:
            return []
        first = self._predictions[0]
        budget = max(1, first.batch_size)
        turn: _PredictionTurn = []
        for job in self._predictions:
            if job.adapter != first.adapter or budget == 0:
                continue
            count = min(budget, job.remaining)
            if count:
                turn.append((job, len(job.outputs), count))
                budget -= count
        return turn

    def _predict_between_steps(self, prepared: PreparedBatch) -> bool:
        """Inside a generation batch, after a decode step: one prediction turn if any waits (not when a control
        waits: it will change the model after the batch), then the batch's arrangement back. True if one ran."""
        with self._wakeup:
            turn = self._prediction_turn() if self._predictions and not self._controls else []
        if not turn:
            return False
        self._run_predictions(turn)
        assert prepared.rearrange is not None  # only batches that can be re-arranged call this
        prepared.rearrange()
        return True

    def _run_predictions(self, turn: _PredictionTurn) -> None:
        assert self._classify is not None  # submit_prediction refuses jobs otherwise
        rows = [row for job, start, count in turn for row in job.rows[start : start + count]]
        try:
            outputs = self._classify(turn[0][0].adapter, rows)
        except Exception as error:
            if not isinstance(error, AppError):
                logger.exception("classification failed for a forward of %d rows", len(rows))
            finished = [job for job, _, _ in turn]
            for job in finished:
                job.fail(error)
        else:
            position = 0
            for job, _, count in turn:
                job.outputs.extend(outputs[position : position + count])
                position += count
            finished = [job for job, _, _ in turn if job.remaining == 0]
            for job in finished:
                job.resolve()
        with self._wakeup:
            for job in finished:
                if job in self._predictions:
                    self._predictions.remove(job)

    @staticmethod
    def _skip_cancelled(job: GenerationJob) -> bool:
        if job.cancelled.is_set():
            job.finish_reason = "cancelled"
            job.resolve()
            return True
        return False

    def _run_batch(self, jobs: list[GenerationJob]) -> None:
        try:
            prepared = self._prepare(jobs)
            if prepared.jobs:
                self._generate(prepared)
        except Exception as error:
            if not isinstance(error, AppError):
                logger.exception("generation failed for a batch of %d", len(jobs))
            for job in jobs:
                job.fail(error)
            return
        for job in prepared.jobs:
            if job.error is not None:
                job.fail(job.error)
            else:
                job.resolve()

    def _generate(self, prepared: PreparedBatch) -> None:
        jobs = prepared.jobs
        pad_id = self._tokenizer.pad_token_id
        width = max(len(job.input_ids) for job in jobs)
        # Left padding: every row's next token sits in the last column.
        input_ids = torch.tensor([[pad_id] * (width - len(j.input_ids)) + j.input_ids for j in jobs])
        attention_mask = torch.tensor([[0] * (width - len(j.input_ids)) + [1] * len(j.input_ids) for j in jobs])
        device = prepared.model.device
        kwargs: dict[str, Any] = {}
        if prepared.adapter_names is not None:
            kwargs["adapter_names"] = prepared.adapter_names
        processors = LogitsProcessorList([_RowGuard(jobs, self._eos_ids)])
        stopping = StoppingCriteriaList([_RowsFinished(jobs)])
        if prepared.rearrange is not None and self._classify is not None:
            stopping.append(_BetweenSteps(lambda: self._predict_between_steps(prepared)))
        if all(job.params.temperature == 0 for job in jobs):
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
            processors.append(_PerRowSampling(jobs, device))
        with torch.inference_mode():
            # transformers types `generate`'s self as a Protocol its own models do not satisfy for mypy
            # (settable `device` and `dtype`, which PreTrainedModel has as read-only properties).
            prepared.model.generate(  # type: ignore[misc]
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max(job.params.max_new_tokens for job in jobs),
                pad_token_id=pad_id,
                streamer=_BatchStreamer(jobs, self._tokenizer, self._eos_ids),
                stopping_criteria=stopping,
                logits_processor=processors,
                **kwargs,
            )


def _eos_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return ids | ({end_of_turn} if isinstance(end_of_turn, int) else set())


class _RowGuard(LogitsProcessor):
    """Before any sampling, per row: a row whose scores are not finite (an adapter or mix that overflows) fails
    alone, its row ended; a row with no token yet may not end, so an answer is never silently empty because the
    model's first choice was end-of-turn."""

    def __init__(self, jobs: list[GenerationJob], eos_ids: set[int]) -> None:
        self._jobs = jobs
        self._eos = sorted(eos_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        broken = (~torch.isfinite(scores).all(dim=-1)).tolist()
        for row, (job, is_broken) in enumerate(zip(self._jobs, broken, strict=True)):
            if is_broken and job.error is None:
                job.error = NumericalFailureError(
                    "the adapter (or weighted mix) produced non-finite values for this request; "
                    "other requests are unaffected"
                )
                logger.error("row %d of a batch of %d: non-finite logits; that row fails alone", row, len(broken))
            if job.error is not None:
                scores[row] = 0.0  # finite, so sampling the batch still works; the row ends at its next token
            elif not job.tokens and self._eos:
                scores[row, self._eos] = float("-inf")
        return scores


class _PerRowSampling(LogitsProcessor):
    """Temperature and top-p per row; greedy rows (temperature 0) keep only their argmax. A row with a seed draws
    its token here, from its own generator, and keeps only that token, so generate()'s draw (from the process's
    one random stream, shared by the batch) cannot change it: the same request alone gives the same answer again.
    Beside other rows its logits may differ in the last bits (padding, reduced precision), and so may a draw."""

    def __init__(self, jobs: list[GenerationJob], device: torch.device) -> None:
        self._temperature = torch.tensor([[j.params.temperature] for j in jobs], device=device)
        self._top_p = torch.tensor([[j.params.top_p] for j in jobs], device=device)
        self._generators = [
            torch.Generator(device=device).manual_seed(job.params.seed)
            if job.params.seed is not None and job.params.temperature > 0 else None
            for job in jobs
        ]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        scaled = logits / self._temperature.clamp(min=1e-5)
        sorted_scores, order = scaled.sort(dim=-1, descending=True)
        probabilities = sorted_scores.softmax(dim=-1)
        # Drop a token once the tokens before it already reach top_p (the most likely one always stays).
        drop_sorted = (probabilities.cumsum(dim=-1) - probabilities) >= self._top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        sampled = scaled.masked_fill(drop, float("-inf"))
        only_argmax = torch.full_like(logits, float("-inf")).scatter(1, logits.argmax(dim=-1, keepdim=True), 0.0)
        chosen = torch.where(self._temperature == 0, only_argmax, sampled)
        for row, generator in enumerate(self._generators):
            if generator is not None:
                token = torch.multinomial(sampled[row].softmax(dim=-1), 1, generator=generator)
                chosen[row] = torch.full_like(chosen[row], float("-inf")).scatter(0, token, 0.0)
        return chosen  # type: ignore[return-value]


class _RowsFinished(StoppingCriteria):
    def __init__(self, jobs: list[GenerationJob]) -> None:
        self._jobs = jobs

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> torch.BoolTensor:
        done = [job.finish_reason is not None or job.cancelled.is_set() or job.error is not None for job in self._jobs]
        return torch.tensor(done, device=input_ids.device)  # type: ignore[return-value]


class _BetweenSteps(StoppingCriteria):
    """Not a stop: generate() calls its criteria once after every decode step, the one point inside a batch where
    other work may use the model (the batch's next forward has not begun). Work runs there only while it has
    taken no more time than the batch's own steps, so a running generation keeps at least half the engine."""

    def __init__(self, work: Callable[[], bool]) -> None:
        self._work = work
        self._resumed = time.perf_counter()  # when the batch's own computation last resumed
        self._batch_s = 0.0
        self._work_s = 0.0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> torch.BoolTensor:
        started = time.perf_counter()
        self._batch_s += started - self._resumed
        if self._work_s <= self._batch_s and self._work():
            self._work_s += time.perf_counter() - started
        self._resumed = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _BatchStreamer(BaseStreamer):
    """Receives each step's new tokens for all rows; keeps each row's text and streams its new part."""

    def __init__(self, jobs: list[GenerationJob], tokenizer: PreTrainedTokenizerBase, eos_ids: set[int]) -> None:
        self._jobs = jobs
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        for job, token in zip(self._jobs, value.view(-1).tolist(), strict=True):
            if job.finish_reason is not None:
                continue
            if job.cancelled.is_set():
                job.finish_reason = "cancelled"
            elif job.error is not None or token in self._eos_ids:
                job.finish_reason = "stop"
            else:
                job.tokens.append(token)
                if len(job.tokens) >= job.params.max_new_tokens:
                    job.finish_reason = "length"
            self._emit(job)

    def end(self) -> None:
        for job in self._jobs:
            if job.finish_reason is None:
                job.finish_reason = "length"
            self._emit(job)

    def _emit(self, job: GenerationJob) -> None:
        # One sequence decodes to a str; transformers types every decode as `str | list[str]` (no overload).
        text: str = self._tokenizer.decode(job.tokens, skip_special_tokens=True)  # type: ignore[assignment]
        for stop in job.params.stop:
            position = text.find(stop)
            if position >= 0:
                text, job.finish_reason = text[:position], "stop"
        if job.finish_reason is None:
            # Hold back a half-decoded character and anything that may be the start of a stop string.
            text = text.rstrip("\ufffd")
            text = text[: len(text) - _partial_stop_length(text, job.params.stop)]
        if not text.startswith(job.text):
            return  # the tokenizer re-joined earlier pieces; wait until the text grows past them
        delta, job.text = text[len(job.text) :], text
        if delta and job.on_text is not None:
            job.on_text(delta)


def _partial_stop_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
