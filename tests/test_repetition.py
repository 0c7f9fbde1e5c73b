"""A local answer that has begun to repeat itself is stopped there, saying so, instead of running to
MAX_NEW_TOKENS; answers that do not repeat are untouched."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.llm.backends.hf import HFLoraBackend
from app.llm.base import REPETITION_NOTICE, GenerationParams
from app.llm.engine.rows.repetition import RepetitionGuard
from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

LOOPING = "你好，请介绍一下你自己"  # the design card's own question; SmolLM2 alone loops on it
PLAIN = "What is the capital of France?"


def test_the_guard_sees_a_span_repeated_running_and_nothing_shorter_or_fewer() -> None:
    guard = RepetitionGuard(min_span=3, repeats=3)
    span = [7, 8, 9]
    assert guard.repeating([1, 2, *span, *span, *span])
    assert guard.repeating([5, *span * 20])  # however long it has gone on
    assert not guard.repeating([1, 2, *span, *span])  # twice is not a loop yet
    assert not guard.repeating([*span, 0, *span, *span])  # not running
    assert not guard.repeating([4, 4, 4, 4, 4, 4, 4, 4])  # a span of 1 is shorter than min_span...
    assert RepetitionGuard(min_span=1, repeats=3).repeating([4, 4, 4])  # ...unless it may be that short
    assert not RepetitionGuard(min_span=3, repeats=0).repeating([*span * 10])  # 0: off


def _generate(backend: HFLoraBackend, question: str, budget: int) -> Any:
    return asyncio.run(backend.generate([{"role": "user", "content": question}], GenerationParams(budget, 0.0, 1.0)))


@pytest.fixture
def served(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> Iterator[str]:
    settings = make_settings(tmp_path, vector_store_path=corpus_store, ollama_base_url=ollama.base_url,
                             max_new_tokens=512)
    with running_server(create_app(settings)) as url:
        yield url


@pytest.mark.slow
@pytest.mark.numerics
def test_a_looping_answer_stops_early_on_every_surface_and_a_plain_one_is_untouched(
    tmp_path: Path, served: str
) -> None:
    unguarded = HFLoraBackend.load(make_settings(tmp_path, repetition_repeats=0))
    try:
        loop = _generate(unguarded, LOOPING, 160)
        plain = _generate(unguarded, PLAIN, 24)
    finally:
        asyncio.run(unguarded.close())
    assert loop.finish_reason == "length"  # the precondition: without the guard it runs to its budget

    client = openai.OpenAI(base_url=f"{served}/v1", api_key="x", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    stopped = client.chat.completions.create(model=model, messages=[{"role": "user", "content": LOOPING}],
                                             max_tokens=512, temperature=0)
    assert stopped.choices[0].finish_reason == "stop"  # OpenAI's clients know no other reason for it
    assert stopped.model_extra and stopped.model_extra.get("notice") == REPETITION_NOTICE
    assert stopped.usage is not None and stopped.usage.completion_tokens < 160
    assert loop.text.startswith(stopped.choices[0].message.content or "")  # the same answer, stopped early
    again = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PLAIN}],
                                           max_tokens=24, temperature=0)
    assert again.choices[0].message.content == plain.text and not (again.model_extra or {}).get("notice")

    asked = httpx.post(f"{served}/ask", json={"query": LOOPING}, timeout=300).json()
    assert asked["finish_reason"] == "repetition" and asked["notice"] == REPETITION_NOTICE
    assert asked["usage"]["completion_tokens"] < 512
