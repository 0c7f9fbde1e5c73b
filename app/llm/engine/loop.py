"""Continuous batching on one worker thread.

Every use of the model happens on this thread: prefills, decode steps and, between steps, control tasks such as
loading or unloading an adapter. So an adapter is never changed under a running forward pass, and no lock is held
across a generation. The engine owns its decode loop: rows decode together, each with its own adapter, sampling
settings, token budget, stop strings and streaming callback, and the set of rows changes at every step.

- **Admission at the next step.** A new request's prompt is prefilled alone, between two decode steps of the
  running rows, in chunks of PREFILL_CHUNK_TOKENS, one chunk per running row each turn: one stream waits a chunk
  at a time, and under load newcomers wait less for their first token while streams wait longer between tokens.
  Chunks always start at multiples of PREFILL_CHUNK_TOKENS, so a prompt's numbers never depend on the load or on
  the prefix cache. Prompts of different lengths are never padded to each other. Once prefilled, the row joins
  the batch: its KV cache is left-padded to the batch's length (or the batch's to its) and masked.
- **Leaving at once.** A row that finishes, is cancelled or fails leaves the batch after the step that ended it;
  its slot (MAX_BATCH_SIZE rows in all, the one prefilling counted) is free at the next step.
- **Adapters.** `RowModel.admit` attaches what a row needs when it is admitted and keeps it attached while the row
  runs (LRU eviction passes over it); `arrange` sets the model up for the rows of each forward pass. A control that
  drains an adapter (an unload) waits until the rows on it have finished, and no new row on it is admitted
  meanwhile; other controls run at the next step.
- **Surviving any request.** A failure of one row (its adapter, its seed, its streaming callback) fails that row
  alone; an unexpected failure of a whole turn fails the rows it was running, and the engine goes on. Should the
  thread still end (or a turn run past `stall_seconds`), `problem` says so, /health and readiness report it, queued
  and new requests fail at once with 503 instead of waiting, and `close` returns within its bound.
- **Classification.** Predictions (`PredictionJob`) run here too, one forward of at most a request's batch size
  and PREDICTION_TURN_TOKENS per turn, rows of every queued request on the same classifier sharing it; a request
  whose client left is dropped at the next turn. A turn runs between two steps while
  predictions have taken no more time than generation since the engine was last idle, so a waiting prediction
  starts within a step or two and a running generation keeps at least half of the engine's time.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from app.errors import AppError, BackendUnavailableError, EngineFailureError, NumericalFailureError
from app.llm.base import OutputConstraint
from app.llm.engine.jobs import AdapterChoice, GenerationJob, PredictionJob
from app.llm.engine.prefix_cache import KVKey, PrefixCache
from app.llm.engine.rows.detokenize import IncrementalDetokenizer
from app.llm.engine.rows.grammar import ConstrainedRow, ConstraintCompiler
from app.llm.engine.rows.pipeline import (
    LogprobRecorder,
    NoEmptyAnswer,
    PenaltyShaper,
    RowSteps,
    ScoreShaper,
    TokenBudget,
    TokenWatcher,
)
from app.llm.engine.rows.repetition import RepetitionGuard
from app.llm.engine.rows.sampling import sample

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import DynamicCache, PreTrainedTokenizerBase
    from transformers.cache_utils import DynamicLayer

    # What AutoModelForCausalLM loads: a PreTrainedModel with GenerationMixin's `generate` (transformers
    # declares this type for type checkers only; PreTrainedModel alone has no `generate`).
    from transformers.models.auto.modeling_auto import _BaseModelWithGenerate as CausalLM

    #: The model that serves: the causal LM, or PEFT's wrapper around it once an adapter is attached.
    ServedModel = CausalLM | PeftModel

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Runs one forward pass for a classifier (its PEFT adapter name) over token-id rows: one output per row.
Classify = Callable[[str, list[list[int]]], Sequence[object]]
#: A turn prefills one chunk per decoding row, at most this many. Each chunk is a forward of its own, starting at a
#: multiple of PREFILL_CHUNK_TOKENS, so a prompt's KV is computed the same way under any load and with or without
#: the prefix cache (a greedy or seeded answer does not depend on either). A prefill's chunks are each followed by
#: a turn's decode step: with 8 rows on 4 adapters (SmolLM2, 715-token prompts) one chunk a turn gave 0.35
#: requests/s and a first token p50 of 2.3 s; see docs/performance.md section 12 for a chunk per row.
_MAX_CHUNKS = 16
#: A prediction turn's forward holds at most this many tokens (rows x the longest row, as padded): a pause of about
#: four prefill chunks for the streams decoding beside it, never the whole request (256 texts of 1,400 characters at
#: batch_size 256 were one 161 s forward, during which no stream got a token).
PREDICTION_TURN_TOKENS = 512
#: A prediction turn: slices (job, first row, row count) of queued jobs on one classifier.
_PredictionTurn = list[tuple[PredictionJob, int, int]]


@dataclass(frozen=True)
class Arrangement:
    """The model set up for one forward pass's rows, and each row's PEFT adapter name where PEFT itself must pick
    the adapter per row (`adapter_names=`; None when the model already runs every row's own weights)."""

    model: ServedModel
    adapter_names: list[str] | None = None


@dataclass(frozen=True)
class Admission:
    """A row let in: the PEFT name of its adapter (or mix, or BASE_KEY) and what its KV is computed with."""

    peft_name: str
    kv_key: KVKey


class RowModel(Protocol):
    """What the engine needs from the model's owner (AdapterManager); called on the engine thread only."""

    def admit(self, choice: AdapterChoice) -> Admission:
        """Attach what a new row needs and keep it attached until `release`. AppError: the row cannot run (it
        fails alone)."""

    def release(self, choice: AdapterChoice) -> None:
        """The row admitted with `choice` has left the batch."""

    def arrange(self, peft_names: list[str]) -> Arrangement:
        """Set the model up for rows with these PEFT names (cheap when nothing changed since the last call)."""


@dataclass
class _Control:
    function: Callable[[], Any]
    future: concurrent.futures.Future[Any]
    drain: str | None  # an adapter whose rows, running or submitted before this control, must finish first
    submitted: int  # jobs submitted before this control (the first `submitted` sequence numbers)


@dataclass(eq=False)
class _Row:
    """A generation job on the engine: its prefill progress, then its place in the batch."""

    job: GenerationJob
    admission: Admission
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    steps: RowSteps
    cache: DynamicCache | None = None  # its own cache while it prefills
    prefilled: int = 0  # prompt tokens in its cache so far

    @property
    def done(self) -> bool:
        job = self.job
        return job.finish_reason is not None or job.error is not None

    @property
    def next_token(self) -> int:
        """What the next decode step feeds: the last token taken (a row in the batch has taken at least one)."""
        return self.job.tokens[-1]

    @property
    def position(self) -> int:
        """The next token's position: after the prompt and every token taken before it."""
        return len(self.job.input_ids) + len(self.job.tokens) - 1


@dataclass
class _Batch:
    """The running rows' shared KV cache, left-padded, and its attention mask (0 over each row's padding)."""

    cache: DynamicCache
    mask: torch.Tensor  # (rows, columns), long
    rows: list[_Row] = field(default_factory=list)

    def join(self, row: _Row) -> None:
        assert row.cache is not None
        width = max(self.mask.shape[1], row.prefilled)
        for mine, theirs in zip(_kv_layers(self.cache), _kv_layers(row.cache), strict=True):
            (keys, values), (row_keys, row_values) = _kv(mine), _kv(theirs)
            mine.keys = torch.cat([_pad_left(keys, width), _pad_left(row_keys, width)])
            mine.values = torch.cat([_pad_left(values, width), _pad_left(row_values, width)])
        own = torch.ones((1, row.prefilled), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(own, width)])
        row.cache = None
        self.rows.append(row)

    def keep(self, rows: list[_Row]) -> None:
        """Only `rows` (a subset, in order) stay; columns that are padding for every row left go too."""
        index = torch.tensor([self.rows.index(row) for row in rows], device=self.mask.device)
        mask = self.mask[index]
        start = int(mask.any(dim=0).int().argmax())
        self.mask = mask[:, start:]
        for layer in _kv_layers(self.cache):
            keys, values = _kv(layer)
            layer.keys, layer.values = keys[index, :, start:], values[index, :, start:]
        self.rows = rows


def _kv_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, each holding its keys and values as (rows, heads, columns, head size) tensors. A cache
    built without the model's config has only these (models with linear attention are not served here)."""
    from transformers.cache_utils import DynamicLayer

    layers = [layer for layer in cache.layers if isinstance(layer, DynamicLayer)]
    if len(layers) != len(cache.layers):
        raise TypeError("this model's KV cache has layers that cannot be batched row by row")
    return layers


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None  # every layer has run once the prompt is in
    return layer.keys, layer.values


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the sequence dimension's entries (the last of a mask, the next to last of keys and values)."""
    missing = width - (tensor.shape[-1] if tensor.dim() == 2 else tensor.shape[-2])
    if missing == 0:
        return tensor
    padding = (missing, 0) if tensor.dim() == 2 else (0, 0, missing, 0)
    return torch.nn.functional.pad(tensor, padding)


class GenerationEngine:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: RowModel,
        *,
        max_batch_size: int,
        prefill_chunk_tokens: int,
        prefix_cache_bytes: int,
        stall_seconds: float,
        repetition: RepetitionGuard,
        classify: Classify | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._repetition = repetition
        self._model = model
        self._classify = classify
        self._max_rows = max_batch_size
        self._chunk = prefill_chunk_tokens
        self._prefixes = PrefixCache(prefix_cache_bytes)
        self._eos_ids = _eos_token_ids(tokenizer)
        self._eos = sorted(self._eos_ids)
        self._constraints = ConstraintCompiler(tokenizer, self._eos_ids)
        # Shared with the request side, under the lock.
        self._wakeup = threading.Condition()
        self._jobs: deque[tuple[int, GenerationJob]] = deque()  # with each job's sequence number
        self._submitted = 0
        self._predictions: deque[PredictionJob] = deque()
        self._controls: deque[_Control] = deque()
        self._stopped: BackendUnavailableError | None = None  # why the engine no longer runs, once it does not
        # Written by the engine thread, read by `problem` from any thread.
        self._stall_seconds = stall_seconds
        self._turn_started: float | None = None  # time.monotonic() when the running turn began; None between turns
        # The engine thread's own.
        self._batch: _Batch | None = None
        self._prefilling: _Row | None = None
        self._generate_s = 0.0  # time spent generating and predicting since the engine was last idle
        self._predict_s = 0.0
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()

    # -- the request side -------------------------------------------------------------------------

    def submit(self, job: GenerationJob) -> None:
        with self._wakeup:
            self._refuse_when_stopped()
            self._jobs.append((self._submitted, job))
            self._submitted += 1
            self._wakeup.notify()

    def token_bytes(self, token: int) -> bytes:
        """A token's exact bytes (a piece of a UTF-8 character may be one), from llguidance's view of the
        tokenizer; thread-safe."""
        return self._constraints.token_bytes(token)

    def constrained_row(self, constraint: OutputConstraint) -> ConstrainedRow:
        """What a job held to `constraint` carries (`GenerationJob.constraint`); InvalidOutputConstraintError (400)
        when it cannot be compiled. Blocking (milliseconds; the first one also sets up the tokenizer): call it off
        the event loop, before submitting."""
        return self._constraints.row(constraint)

    def submit_prediction(self, job: PredictionJob) -> None:
        with self._wakeup:
            self._refuse_when_stopped()
            if self._classify is None:
                raise RuntimeError("this engine runs no classification")
            self._predictions.append(job)
            self._wakeup.notify()

    @property
    def pending_predictions(self) -> int:
        """Prediction requests queued or running (not yet answered)."""
        with self._wakeup:
            return len(self._predictions)

    def prefix_cache_stats(self) -> dict[str, int]:
        return self._prefixes.stats()

    def call(self, function: Callable[[], T], *, drain: str | None = None) -> T:
        """Run `function` on the engine thread between decode steps and return its result (blocking). With
        `drain`, once the requests on that adapter (alone or in a mix) submitted before this call have finished;
        requests on it submitted later wait for it to run."""
        if threading.current_thread() is self._thread:
            return function()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._wakeup:
            self._refuse_when_stopped()
            self._controls.append(_Control(function, future, drain, self._submitted))
            self._wakeup.notify()
        return future.result()

    def problem(self) -> str | None:
        """Why the engine cannot serve now (it stopped, or one turn has run past `stall_seconds`); None when it can."""
        with self._wakeup:
            if self._stopped is not None:
                return self._stopped.message
        started = self._turn_started
        if started is not None and time.monotonic() - started > self._stall_seconds:
            return (f"the generation engine has been busy with one step for {time.monotonic() - started:.0f} s, "
                    f"over its bound of {self._stall_seconds:g} s (REQUEST_TIMEOUT_SECONDS): it looks stuck")
        return None

    def close(self, timeout: float = 60.0) -> None:
        """Stop the engine: queued work fails at once, the running step is waited for at most `timeout` seconds,
        and the rows of a step still running then fail too (the thread is left to end on its own)."""
        with self._wakeup:
            self._stop(BackendUnavailableError("the server is shutting down"))
            self._wakeup.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("the generation engine's step did not end within %g s; its rows fail now", timeout)
            for row in self._rows():
                row.job.fail(BackendUnavailableError("the server is shutting down"))

    def _refuse_when_stopped(self) -> None:
        """Under the lock: new work is refused once the engine is closed or its thread has ended."""
        if self._stopped is not None:
            raise self._stopped

    def _stop(self, reason: BackendUnavailableError) -> None:
        """Under the lock: no more work is taken, and the queued work fails with `reason` now."""
        if self._stopped is None:
            self._stopped = reason
        for _, job in self._jobs:
            job.fail(self._stopped)
        for prediction in self._predictions:
            prediction.fail(self._stopped)
        for control in self._controls:
            control.future.set_exception(self._stopped)
        self._jobs.clear()
        self._predictions.clear()
        self._controls.clear()

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self._turn_started = time.monotonic()
                try:
                    self._turn()
                except Exception as error:  # a defect of ours: the rows of this turn fail, the engine goes on
                    logger.exception("an engine step failed; the rows it was running fail with it")
                    self._fail_running(_as_app_error(error))
                finally:
                    self._turn_started = None
        except BaseException as error:  # nothing may end this thread silently: say why, fail what waits
            logger.critical("the generation engine stopped: %r", error, exc_info=error)
            stopped = BackendUnavailableError(
                f"the generation engine stopped ({type(error).__name__}); restart the server to generate again"
            )
            with self._wakeup:
                self._stop(stopped)
            self._fail_running(stopped)
            return
        self._fail_running(BackendUnavailableError("the server is shutting down"))

    def _turn(self) -> None:
        """Controls that are ready, then either a prediction turn or admission, a prefill chunk and a decode step."""
        self._run_ready_controls()
        self._drop_cancelled()
        if self._prediction_due():
            started = time.perf_counter()
            self._run_predictions()
            self._predict_s += time.perf_counter() - started
            return
        started = time.perf_counter()
        self._admit()
        with torch.inference_mode():
            if self._prefilling is not None:
                self._prefill_chunk(self._prefilling)
            if self._batch is not None:
                self._decode_step(self._batch)
        self._generate_s += time.perf_counter() - started

    def _fail_running(self, error: AppError) -> None:
        """Every row in the batch or prefilling fails with `error` and leaves; the KV they held is dropped."""
        rows = self._rows()
        self._batch = self._prefilling = None
        for row in rows:
            try:
                self._leave(row, error)
            except Exception:  # releasing its adapter failed too: the row still fails
                logger.exception("releasing a failed row's adapter failed")
                row.job.fail(error)

    def _rows(self) -> list[_Row]:
        rows = list(self._batch.rows) if self._batch is not None else []
        return rows + ([self._prefilling] if self._prefilling is not None else [])

    def _wait_for_work(self) -> bool:
        """Sleep while there is nothing to do; False once closed."""
        with self._wakeup:
            while not (self._stopped or self._rows() or self._jobs or self._controls or self._predictions):
                self._generate_s = self._predict_s = 0.0
                self._wakeup.wait()
            return self._stopped is None

    def _run_ready_controls(self) -> None:
        """Controls in order, up to the first one still waiting for its adapter's rows to finish."""
        while True:
            with self._wakeup:
                if not self._controls:
                    return
                control = self._controls[0]
                if control.drain is not None:
                    earlier = [job for sequence, job in self._jobs if sequence < control.submitted]
                    if any(control.drain in job.adapter.names for job in [*earlier, *(r.job for r in self._rows())]):
                        return
                self._controls.popleft()
            try:
                control.future.set_result(control.function())
            except BaseException as error:  # handed to the caller, who raises it
                control.future.set_exception(error)

    def _drop_cancelled(self) -> None:
        with self._wakeup:
            for entry in [entry for entry in self._jobs if entry[1].cancelled.is_set()]:
                self._jobs.remove(entry)
                entry[1].finish_reason = "cancelled"
                entry[1].resolve()
        for row in self._rows():
            if row.job.cancelled.is_set() and not row.done:
                row.job.finish_reason = "cancelled"
        self._remove_done()

    def _admit(self) -> None:
        """Start prefilling the first waiting job that may run, if a slot is free."""
        while self._prefilling is None and len(self._rows()) < self._max_rows:
            with self._wakeup:
                entry = next((entry for entry in self._jobs if self._may_start(*entry)), None)
                if entry is None:
                    return
                self._jobs.remove(entry)
                job = entry[1]
            try:
                params = job.params
                generator = (torch.Generator().manual_seed(params.seed)
                             if params.seed is not None and params.temperature > 0 else None)
                admission = self._model.admit(job.adapter)
            except Exception as error:
                _log_unexpected(error, "admitting a generation")
                job.fail(_as_app_error(error))
                continue
            self._prefilling = _Row(job, admission, generator, IncrementalDetokenizer(self._tokenizer),
                                    self._row_steps(job))

    def _row_steps(self, job: GenerationJob) -> RowSteps:
        """The pieces of a row's per-token step its request asks for (`rows/pipeline.py`)."""
        params = job.params
        shapers: list[ScoreShaper] = [NoEmptyAnswer(self._eos)] if self._eos else []
        watchers: list[TokenWatcher] = []
        if params.penalties.active:
            shapers.append(PenaltyShaper(params.penalties))
        if job.constraint is not None:
            shapers.append(job.constraint)
            watchers.append(job.constraint)
        watchers += [TokenBudget(params.max_new_tokens), self._repetition]
        recorders = (LogprobRecorder(params.logprobs, job.logprobs),) if params.logprobs is not None else ()
        return RowSteps(tuple(shapers), tuple(watchers), recorders)

    def _may_start(self, sequence: int, job: GenerationJob) -> bool:
        """Under the lock: not held back by a waiting drain submitted before it."""
        return not any(control.drain in job.adapter.names and control.submitted <= sequence
                       for control in self._controls if control.drain is not None)

    def _forward(self, rows: list[_Row], **inputs: Any) -> Any:
        arrangement = self._model.arrange([row.admission.peft_name for row in rows])
        if arrangement.adapter_names is not None:
            inputs["adapter_names"] = arrangement.adapter_names
        device = arrangement.model.device
        tensors = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                   for key, value in inputs.items()}
        return arrangement.model(**tensors, use_cache=True, logits_to_keep=1)

    def _prefill_chunk(self, row: _Row) -> None:
        prompt = row.job.input_ids
        try:
            if row.cache is None:
                row.cache = self._start_cache(row)
            for _ in range(min(len(self._batch.rows), _MAX_CHUNKS) if self._batch is not None else 1):
                chunk = prompt[row.prefilled : row.prefilled + self._chunk]
                output = self._forward([row], input_ids=torch.tensor([chunk]), past_key_values=row.cache)
                row.prefilled += len(chunk)
                if row.prefilled == len(prompt):
                    break
            if row.prefilled < len(prompt):
                return
            self._prefixes.add(row.admission.kv_key, prompt, row.cache)
            self._take_tokens([row], output.logits[:, -1])
            self._prefilling = None
        except Exception as error:
            _log_unexpected(error, "prefilling a prompt")
            self._prefilling = None
            self._leave(row, _as_app_error(error))
            return
        if row.done:
            self._leave(row)
        elif self._batch is None:
            self._batch = _Batch(row.cache, torch.ones((1, row.prefilled), dtype=torch.long), [row])
            row.cache = None
        else:
            self._batch.join(row)

    def _start_cache(self, row: _Row) -> DynamicCache:
        """A new row's KV cache: empty, or the longest beginning of its prompt (whole chunks) already computed on
        its weights."""
        from transformers import DynamicCache

        cache = DynamicCache()
        reused, layers = self._prefixes.longest(row.admission.kv_key, row.job.input_ids, self._chunk)
        for index, (keys, values) in enumerate(layers):
            cache.update(keys, values, index)
        row.prefilled = reused
        return cache

    def _decode_step(self, batch: _Batch) -> None:
        rows = batch.rows
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(rows), 1))], dim=1)
        try:
            output = self._forward(
                rows,
                input_ids=torch.tensor([[row.next_token] for row in rows]),
                position_ids=torch.tensor([[row.position] for row in rows]),
                attention_mask=batch.mask,
                past_key_values=batch.cache,
            )
            self._take_tokens(rows, output.logits[:, -1])
        except Exception as error:
            _log_unexpected(error, f"a decode step of {len(rows)} rows")
            self._batch = None
            for row in rows:
                self._leave(row, _as_app_error(error))
            return
        self._remove_done()

    def _remove_done(self) -> None:
        batch = self._batch
        if self._prefilling is not None and self._prefilling.done:
            self._leave(self._prefilling)
            self._prefilling = None
        if batch is None or not any(row.done for row in batch.rows):
            return
        staying = [row for row in batch.rows if not row.done]
        for row in batch.rows:
            if row.done:
                self._leave(row)
        if staying:
            batch.keep(staying)
        else:
            self._batch = None

    def _leave(self, row: _Row, error: BaseException | None = None) -> None:
        self._model.release(row.job.adapter)
        job = row.job
        failure = error or job.error
        if failure is not None:
            job.fail(failure)
        else:
            job.resolve()

    def _take_tokens(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row's step (`rows/pipeline.py`) on its logits (rows, vocabulary): its shapers, its token chosen
        greedy or sampled with its settings, its watchers; then its text and stop strings. A row whose step fails
        (its constraint, its sampling, its streaming callback) fails alone."""
        logits = logits.float()
        broken = (~torch.isfinite(logits).all(dim=-1)).tolist()
        shaping_failed: dict[int, AppError] = {}
        for index, row in enumerate(rows):
            try:
                row.steps.shape(logits[index], row.job.tokens)
            except Exception as error:
                _log_unexpected(error, f"row {index} of {len(rows)}")
                shaping_failed[index] = _as_app_error(error)
        chosen = logits.argmax(dim=-1).tolist()  # greedy rows' tokens, in one pass over the batch
        for index, row in enumerate(rows):
            job = row.job
            if broken[index]:
                job.error = NumericalFailureError(
                    "the adapter (or weighted mix) produced non-finite values for this request; "
                    "other requests are unaffected"
                )
                logger.error("row %d of %d: non-finite logits; that row fails alone", index, len(rows))
                continue
            if index in shaping_failed:
                job.error = shaping_failed[index]
                continue
            try:
                self._take_token(row, logits[index], chosen[index])
            except Exception as error:
                _log_unexpected(error, f"row {index} of {len(rows)}")
                job.error = _as_app_error(error)

    def _take_token(self, row: _Row, logits: torch.Tensor, greedy: int) -> None:
        job = row.job
        token = sample(logits, job.params, row.generator) if job.params.temperature > 0 else greedy
        if token in self._eos_ids:
            job.finish_reason = "stop"
        else:
            row.steps.record(logits, token)
            job.tokens.append(token)
            row.detokenizer.add(token)
            job.finish_reason = row.steps.watch(token, job.tokens)
        _emit(job, row.detokenizer.text)

    # -- predictions ------------------------------------------------------------------------------

    def _prediction_due(self) -> bool:
        with self._wakeup:
            if not self._predictions:
                return False
            generating = bool(self._rows() or self._jobs)
            return not generating or self._predict_s <= self._generate_s

    def _run_predictions(self) -> None:
        with self._wakeup:
            turn = self._prediction_turn()
        if not turn:
            return
        assert self._classify is not None  # submit_prediction refuses jobs otherwise
        rows = [row for job, start, count in turn for row in job.rows[start : start + count]]
        try:
            with torch.inference_mode():
                outputs = self._classify(turn[0][0].adapter, rows)
        except Exception as error:
            _log_unexpected(error, f"classification of a forward of {len(rows)} rows")
            finished = [job for job, _, _ in turn]
            for job in finished:
                job.fail(_as_app_error(error))
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

    def _prediction_turn(self) -> _PredictionTurn:
        """Under the lock: the next forward's rows, FIFO from the queued jobs on the first job's classifier, at
        most that job's batch size and PREDICTION_TURN_TOKENS padded tokens (one row at least). Cancelled jobs
        leave the queue."""
        for job in [job for job in self._predictions if job.cancelled.is_set()]:
            self._predictions.remove(job)
            job.future.cancel()
        if not self._predictions:
            return []
        first = self._predictions[0]
        most_rows = max(1, first.batch_size)
        turn: _PredictionTurn = []
        taken = longest = 0
        for job in self._predictions:
            if job.adapter != first.adapter:
                continue
            start = len(job.outputs)
            count = 0
            for row in job.rows[start:]:
                wider = max(longest, len(row))
                if taken == most_rows or (taken and (taken + 1) * wider > PREDICTION_TURN_TOKENS):
                    break
                taken, longest, count = taken + 1, wider, count + 1
            if count:
                turn.append((job, start, count))
            if count < job.remaining:
                break  # the turn is full; later jobs wait their turn
        return turn


def _log_unexpected(error: Exception, what: str) -> None:
    if not isinstance(error, AppError):
        logger.exception("%s failed", what)


def _as_app_error(error: Exception) -> AppError:
    """What the caller of a failed row is told: our own error as it is, anything else as an engine failure (its
    traceback is in the log)."""
    if isinstance(error, AppError):
        return error
    return EngineFailureError(
        f"generation failed in the engine ({type(error).__name__}); other requests are unaffected"
    )


def _eos_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return ids | ({end_of_turn} if isinstance(end_of_turn, int) else set())


def _emit(job: GenerationJob, text: str) -> None:
    """The job's complete text so far (`text`, from its detokenizer), cut at a stop string; its new part streamed."""
    for stop in job.params.stop:
        position = text.find(stop)
        if position >= 0:
            text, job.finish_reason = text[:position], "stop"
    if job.finish_reason is None:
        # Hold back anything that may be the start of a stop string.
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
