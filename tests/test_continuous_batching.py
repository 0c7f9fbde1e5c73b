"""Continuous batching on the real model, as a user of the backend sees it.

What is promised (greedy decoding in float32, where answers compare exactly):

- A request that arrives while a batch is decoding joins that batch at one of its next decode steps instead of
  waiting for the batch to end; its answer is exactly the answer it gets alone, whether it runs on the base model,
  one adapter or a weighted mix, and the running rows' answers do not change either.
- A prompt longer than PREFILL_CHUNK_TOKENS that arrives while a stream decodes is prefilled a chunk at a time
  between the stream's steps: the stream goes on streaming meanwhile, and the newcomer answers exactly as alone.
- A row that finishes or is cancelled leaves the batch at once: with every slot (MAX_BATCH_SIZE) busy, a waiting
  request takes the freed slot and completes while the other long row goes on, each with its alone answer.
- An adapter unloaded and loaded again under the same name answers with the new weights, never the old ones
  (alone and in mixes).
- Unloading an adapter with rows in flight on it lets those rows finish with their full answer; requests naming
  it afterwards get AdapterNotFoundError (404).
- Loads run between decode steps: one that arrives while rows of different adapters decode together, or after a
  batch of them emptied by cancellations alone, succeeds and answers as the adapter does anywhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.llm.adapters.manager import AdapterNotFoundError
from app.llm.backends.hf import HFLoraBackend
from app.llm.base import AdapterSpec, ChatMessage, GenerationParams, GenerationResult
from app.llm.model_source import resolve_base_model
from tests.conftest import make_settings
from tests.test_adapters import _save_lora

pytestmark = [pytest.mark.slow, pytest.mark.numerics]

#: Every wait on the model is bounded, generously (two slow CPU cores).
TIMEOUT_S = 120.0
#: Pieces a long request streams before others are sent: proof that its batch is decoding.
STARTED_PIECES = 3

SHORT = GenerationParams(max_new_tokens=24, temperature=0.0, top_p=1.0)
LONG = GenerationParams(max_new_tokens=80, temperature=0.0, top_p=1.0)
#: Rows in flight when their adapter is unloaded.
IN_FLIGHT = GenerationParams(max_new_tokens=64, temperature=0.0, top_p=1.0)
#: Enough tokens to tell two adapters' answers apart.
RELOAD = GenerationParams(max_new_tokens=12, temperature=0.0, top_p=1.0)

FRUITS: list[ChatMessage] = [{"role": "user", "content": "Name three fruits."}]
DRAGON: list[ChatMessage] = [
    {"role": "user", "content": "Write a long story about a dragon who learns to cook. Describe every step in great "
                                "detail."}
]
#: Long on every adapter here (a greedy story on some random adapters ends after a dozen tokens).
COUNT: list[ChatMessage] = [
    {"role": "user", "content": "Count from 1 to 300, writing each number in words on its own line."}
]
WATER: list[ChatMessage] = [
    {"role": "user", "content": "Explain, step by step and at length, how a city's water supply works, from the "
                                "rain to the tap."}
]

#: A RAG-like prompt of about 130 tokens: several chunks at CHUNK tokens.
MANUAL: list[ChatMessage] = [
    {"role": "system", "content": "You answer questions about the user's documents, using only these passages. "
                                  "The water plant filters river water through sand, then adds chlorine. " * 4},
    {"role": "user", "content": "How is the river water cleaned?"},
]
CHUNK = 16

BASE: AdapterSpec = ()
ONE: AdapterSpec = (("one", 1.0),)
TWO: AdapterSpec = (("two", 1.0),)
MIX: AdapterSpec = (("one", 0.5), ("two", 0.5))

#: What a user compares between two answers: the text, why it ended, and how many tokens it took.
Answer = tuple[str, str, int]


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random LoRAs on q/v, each changing the greedy answer: "one" and "two" served by name, "first" and "second"
    for the reload test."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("continuous-loras")
    source = resolve_base_model("embedded:SmolLM2-135M-Instruct", None)
    return {name: _save_lora(AutoModelForCausalLM.from_pretrained(source), folder / name, seed, scale=0.2)
            for name, seed in (("one", 11), ("two", 12), ("first", 21), ("second", 22))}


def _serving(folder: Path, loras: dict[str, Path], **overrides: Any) -> Iterator[HFLoraBackend]:
    # No repetition guard: these rows must use their whole budget to keep the batch busy, loops and all.
    backend = HFLoraBackend.load(make_settings(folder, numeric_path="float32", repetition_repeats=0, **overrides))
    for name in ("one", "two"):
        asyncio.run(backend.load_adapter(name, loras[name]))
    try:
        yield backend
    finally:
        asyncio.run(backend.close())


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, loras: dict[str, Path]) -> Iterator[HFLoraBackend]:
    """A backend with room for eight rows, adapters "one" and "two" loaded."""
    yield from _serving(tmp_path_factory.mktemp("wide"), loras, max_batch_size=8)


@pytest.fixture(scope="module")
def two_slots(tmp_path_factory: pytest.TempPathFactory, loras: dict[str, Path]) -> Iterator[HFLoraBackend]:
    """A backend that decodes at most two rows at once, adapters "one" and "two" loaded."""
    yield from _serving(tmp_path_factory.mktemp("narrow"), loras, max_batch_size=2)


@pytest.fixture(scope="module")
def small_chunks(tmp_path_factory: pytest.TempPathFactory, loras: dict[str, Path]) -> Iterator[HFLoraBackend]:
    """A backend that prefills CHUNK tokens per running row each turn and keeps no prompt KV (a prompt asked again is
    prefilled again), adapters "one" and "two" loaded."""
    yield from _serving(tmp_path_factory.mktemp("chunks"), loras, max_batch_size=8, prefill_chunk_tokens=CHUNK,
                        prefix_cache_mb=0)


def _answer(result: GenerationResult) -> Answer:
    return result.text, result.finish_reason, result.completion_tokens


async def _ask(
    backend: HFLoraBackend, messages: list[ChatMessage], params: GenerationParams, spec: AdapterSpec
) -> Answer:
    return _answer(await asyncio.wait_for(backend.generate(messages, params, spec), TIMEOUT_S))


def _alone(backend: HFLoraBackend, messages: list[ChatMessage], params: GenerationParams, spec: AdapterSpec) -> Answer:
    """The request's answer with nothing else running."""
    return _answer(asyncio.run(backend.generate(messages, params, spec)))


class _Stream:
    """Counts a request's streamed pieces and says when it has streamed `wanted` of them."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self._wanted = 0
        self._reached = asyncio.Event()

    def __call__(self, piece: str) -> None:
        self.pieces.append(piece)
        if self._wanted and len(self.pieces) >= self._wanted:
            self._reached.set()

    async def until(self, pieces: int) -> None:
        """Wait until `pieces` pieces in all have been streamed."""
        self._wanted = pieces
        self._reached.clear()
        if len(self.pieces) >= pieces:
            return
        await asyncio.wait_for(self._reached.wait(), TIMEOUT_S)


async def _finishing(name: str, work: Coroutine[Any, Any, GenerationResult], finished: list[str]) -> GenerationResult:
    """`work`'s result, `name` appended to `finished` the moment it is there (the order requests complete in)."""
    result = await work
    finished.append(name)
    return result


def _used_its_budget(answer: Answer, params: GenerationParams = LONG) -> None:
    """A request meant to keep a batch busy must really use its whole budget."""
    assert answer[1] == "length" and answer[2] == params.max_new_tokens, answer


def test_requests_admitted_into_a_running_batch_answer_as_alone_and_finish_before_it(
    backend: HFLoraBackend,
) -> None:
    long_alone = _alone(backend, COUNT, LONG, TWO)
    _used_its_budget(long_alone)
    joining = {"base": BASE, "one": ONE, "mix": MIX}
    alone = {name: _alone(backend, FRUITS, SHORT, spec) for name, spec in joining.items()}
    assert len({answer[0] for answer in alone.values()}) == 3, alone  # each row's own adapter shows in its text

    async def scenario() -> tuple[GenerationResult, dict[str, GenerationResult], list[str], int]:
        finished: list[str] = []
        stream = _Stream()
        running = asyncio.create_task(
            _finishing("long", backend.generate(COUNT, LONG, TWO, on_text=stream), finished)
        )
        await stream.until(STARTED_PIECES)  # the long request is decoding
        sent_at = len(stream.pieces)
        tasks = {name: asyncio.create_task(_finishing(name, backend.generate(FRUITS, SHORT, spec), finished))
                 for name, spec in joining.items()}
        results = await asyncio.wait_for(asyncio.gather(*tasks.values()), TIMEOUT_S)
        long_result = await asyncio.wait_for(running, TIMEOUT_S)
        return long_result, dict(zip(tasks, results, strict=True)), finished, sent_at

    long_result, results, finished, sent_at = asyncio.run(scenario())
    assert sent_at < LONG.max_new_tokens // 2  # the short requests were sent early in the long one's decoding
    # Admitted into the running batch: all three were done while the long request still decoded.
    assert finished[-1] == "long", finished
    for name, result in results.items():
        assert _answer(result) == alone[name], name
    assert [results[name].adapters for name in joining] == ["", "one", "one*0.5+two*0.5"]
    assert _answer(long_result) == long_alone  # the rows that joined did not change the running row's answer
    assert long_result.adapters == "two"


def test_a_long_prompt_is_prefilled_between_a_streams_steps_and_answers_as_alone(small_chunks: HFLoraBackend) -> None:
    backend = small_chunks
    prompt_tokens = len(backend.encode(MANUAL))
    assert prompt_tokens > 6 * CHUNK
    alone = _alone(backend, MANUAL, SHORT, ONE)

    async def scenario() -> tuple[GenerationResult, int]:
        stream, newcomer = _Stream(), _Stream()
        running = asyncio.create_task(backend.generate(COUNT, LONG, TWO, on_text=stream))
        await stream.until(STARTED_PIECES)
        sent_at = len(stream.pieces)
        joining = asyncio.create_task(backend.generate(MANUAL, SHORT, ONE, on_text=newcomer))
        await newcomer.until(1)
        streamed_meanwhile = len(stream.pieces) - sent_at
        result = await asyncio.wait_for(joining, TIMEOUT_S)
        _used_its_budget(_answer(await asyncio.wait_for(running, TIMEOUT_S)))
        return result, streamed_meanwhile

    result, streamed_meanwhile = asyncio.run(scenario())
    # One chunk a turn, each turn one decode step of the stream; less two: the turn it arrived in may be half done,
    # and the last turn's step comes after the newcomer's first token.
    assert streamed_meanwhile >= -(-prompt_tokens // CHUNK) - 2, (streamed_meanwhile, prompt_tokens)
    assert _answer(result) == alone


def test_a_cancelled_row_frees_its_slot_for_a_waiting_request_while_the_other_row_goes_on(
    two_slots: HFLoraBackend,
) -> None:
    other_alone = _alone(two_slots, WATER, LONG, ONE)
    _used_its_budget(other_alone)
    waiting_alone = _alone(two_slots, FRUITS, SHORT, BASE)

    async def scenario() -> tuple[GenerationResult, GenerationResult, list[str], list[str]]:
        finished: list[str] = []
        cancelled_stream, other_stream, waiting_stream = _Stream(), _Stream(), _Stream()
        cancelled = asyncio.create_task(two_slots.generate(DRAGON, LONG, BASE, on_text=cancelled_stream))
        other = asyncio.create_task(
            _finishing("other", two_slots.generate(WATER, LONG, ONE, on_text=other_stream), finished)
        )
        await cancelled_stream.until(STARTED_PIECES)
        await other_stream.until(STARTED_PIECES)  # both slots decoding
        waiting = asyncio.create_task(
            _finishing("waiting", two_slots.generate(FRUITS, SHORT, BASE, on_text=waiting_stream), finished)
        )
        await other_stream.until(len(other_stream.pieces) + 5)  # several decode steps with the third one queued
        assert not waiting.done() and waiting_stream.pieces == []  # no slot: it waits, never a third row
        cancelled.cancel()  # the client went away
        await asyncio.wait_for(asyncio.gather(cancelled, return_exceptions=True), TIMEOUT_S)
        assert cancelled.cancelled()
        waiting_result = await asyncio.wait_for(waiting, TIMEOUT_S)
        other_result = await asyncio.wait_for(other, TIMEOUT_S)
        return waiting_result, other_result, finished, waiting_stream.pieces

    waiting_result, other_result, finished, waiting_pieces = asyncio.run(scenario())
    # The freed slot went to the waiting request at once: it was done while the other long row still decoded.
    assert finished == ["waiting", "other"], finished
    assert _answer(waiting_result) == waiting_alone
    assert "".join(waiting_pieces).strip() == waiting_result.text  # and it streamed as usual
    assert _answer(other_result) == other_alone


def test_an_adapter_loaded_again_under_the_same_name_answers_with_its_new_weights(
    backend: HFLoraBackend, loras: dict[str, Path]
) -> None:
    running: dict[str, AdapterSpec] = {"base": BASE, "one": ONE}
    running_alone = {name: _alone(backend, FRUITS, SHORT, spec) for name, spec in running.items()}
    single: AdapterSpec = (("x", 1.0),)
    mix: AdapterSpec = (("x", 0.5), ("two", 0.5))

    async def scenario() -> tuple[dict[str, GenerationResult], dict[str, Answer]]:
        streams = {name: _Stream() for name in running}
        tasks = {name: asyncio.create_task(backend.generate(FRUITS, SHORT, spec, on_text=streams[name]))
                 for name, spec in running.items()}
        for stream in streams.values():
            await stream.until(1)
        # The first load comes while rows of different adapters decode together (or right after they did).
        await asyncio.wait_for(backend.load_adapter("x", loras["first"]), TIMEOUT_S)
        results = await asyncio.wait_for(asyncio.gather(*tasks.values()), TIMEOUT_S)
        answers: dict[str, Answer] = {}
        try:
            answers["first"] = await _ask(backend, FRUITS, RELOAD, single)
            answers["first mix"] = await _ask(backend, FRUITS, RELOAD, mix)
            await backend.unload_adapter("x")
            await backend.load_adapter("x", loras["second"])
            answers["second"] = await _ask(backend, FRUITS, RELOAD, single)
            answers["second mix"] = await _ask(backend, FRUITS, RELOAD, mix)
            # The same weights under a name never used before: nothing kept from the first "x" can answer for it.
            await backend.load_adapter("y", loras["second"])
            answers["y"] = await _ask(backend, FRUITS, RELOAD, (("y", 1.0),))
            answers["y mix"] = await _ask(backend, FRUITS, RELOAD, (("y", 0.5), ("two", 0.5)))
        finally:
            for name in ("x", "y"):
                if name in backend.describe()["adapters"]:
                    await backend.unload_adapter(name)
        return dict(zip(tasks, results, strict=True)), answers

    results, answers = asyncio.run(scenario())
    for name, result in results.items():
        assert _answer(result) == running_alone[name], name  # the load between their steps changed nothing
    assert answers["second"] != answers["first"]
    assert answers["second"] == answers["y"]
    assert answers["second mix"] != answers["first mix"]
    assert answers["second mix"] == answers["y mix"]


def test_unloading_an_adapter_lets_its_rows_in_flight_finish_then_refuses_it(
    backend: HFLoraBackend, loras: dict[str, Path]
) -> None:
    asyncio.run(backend.load_adapter("leaving", loras["first"]))
    on_it: dict[str, AdapterSpec] = {"single": (("leaving", 1.0),), "mix": (("leaving", 0.5), ("one", 0.5))}
    alone = {name: _alone(backend, COUNT, IN_FLIGHT, spec) for name, spec in on_it.items()}
    for answer in alone.values():
        _used_its_budget(answer, IN_FLIGHT)

    async def scenario() -> dict[str, GenerationResult]:
        streams = {name: _Stream() for name in on_it}
        tasks = {name: asyncio.create_task(backend.generate(COUNT, IN_FLIGHT, spec, on_text=streams[name]))
                 for name, spec in on_it.items()}
        for stream in streams.values():
            await stream.until(STARTED_PIECES)  # both rows decoding on the adapter
        unloading = asyncio.create_task(backend.unload_adapter("leaving"))
        results = await asyncio.wait_for(asyncio.gather(*tasks.values()), TIMEOUT_S)
        await asyncio.wait_for(unloading, TIMEOUT_S)  # the unload itself succeeds
        with pytest.raises(AdapterNotFoundError, match="'leaving' is not loaded") as refused:
            await backend.generate(FRUITS, SHORT, (("leaving", 1.0),))
        assert refused.value.status_code == 404
        with pytest.raises(AdapterNotFoundError):
            await backend.generate(FRUITS, SHORT, (("leaving", 0.5), ("one", 0.5)))
        return dict(zip(tasks, results, strict=True))

    results = asyncio.run(scenario())
    for name, result in results.items():
        assert _answer(result) == alone[name], name  # finished normally, with its full answer
    assert "leaving" not in backend.describe()["adapters"]


def test_a_batch_emptied_by_cancellations_leaves_adapters_loadable_and_answering(
    backend: HFLoraBackend, loras: dict[str, Path]
) -> None:
    one_alone = _alone(backend, FRUITS, SHORT, ONE)
    running: dict[str, AdapterSpec] = {"base": BASE, "one": ONE}

    async def scenario() -> Answer:
        streams = {name: _Stream() for name in running}
        tasks = [asyncio.create_task(backend.generate(DRAGON, LONG, spec, on_text=streams[name]))
                 for name, spec in running.items()]
        for stream in streams.values():
            await stream.until(STARTED_PIECES)  # rows of different adapters decoding together
        for task in tasks:
            task.cancel()  # every client went away: the batch empties by cancellation alone
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT_S)
        await asyncio.wait_for(backend.load_adapter("late", loras["one"]), TIMEOUT_S)
        try:
            return await _ask(backend, FRUITS, SHORT, (("late", 1.0),))
        finally:
            await backend.unload_adapter("late")

    assert asyncio.run(scenario()) == one_alone  # the same weights as "one", so the same answer
