"""The generation engine survives any request (the real SmolLM2 model, float32 where answers compare exactly).

- A seed outside the 64-bit range is the caller's mistake: 400 on /v1 and /api, before anything reaches the engine;
  the largest one that fits samples as any other.
- A row that fails inside the engine (a seed torch refuses, a streaming callback that raises) fails alone, with
  our error family; the rows beside it answer exactly as alone, and later requests are served.
- Should the engine's thread end anyway, /health and readiness say so (503), queued and new requests fail at once
  instead of waiting for their deadline, and the server still shuts down.
- A step that runs past its bound (REQUEST_TIMEOUT_SECONDS) makes the engine report itself stuck, and closing it
  returns within its bound, failing the stuck rows.

Failures are injected through the engine's own job interface (a job's seed and streaming callback): nothing of
ours is replaced.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from fastapi import FastAPI

from app.errors import BackendUnavailableError, EngineFailureError
from app.llm.backends.hf import HFLoraBackend
from app.llm.base import GenerationParams
from app.llm.engine.jobs import BASE_MODEL, GenerationJob
from app.llm.engine.loop import GenerationEngine
from app.main import create_app
from tests.conftest import make_settings, running_server

pytestmark = pytest.mark.slow

TIMEOUT_S = 120.0
GREEDY = GenerationParams(max_new_tokens=16, temperature=0.0, top_p=1.0)
SAMPLED = GenerationParams(max_new_tokens=8, temperature=0.8, top_p=0.95, seed=2**64 - 1)
QUESTION = [{"role": "user", "content": "Name three fruits."}]


class _ThreadKiller(BaseException):
    """Not an Exception: what no `except Exception` catches, standing for anything that could end the thread."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, corpus_store: Path) -> Iterator[tuple[str, FastAPI]]:
    settings = make_settings(tmp_path_factory.mktemp("survival"), vector_store_path=corpus_store,
                             numeric_path="float32")
    app = create_app(settings)
    with running_server(app) as url:
        yield url, app


def _engine(app: FastAPI) -> GenerationEngine:
    backend = app.state.rag_service.models.loaded("lora")
    assert isinstance(backend, HFLoraBackend)
    return backend._engine  # the engine's own job interface, to inject what no HTTP request can send


def _job(app: FastAPI, params: GenerationParams, on_text: object = None) -> GenerationJob:
    backend = app.state.rag_service.models.loaded("lora")
    return GenerationJob(input_ids=backend.encode(QUESTION), params=params, adapter=BASE_MODEL,
                         on_text=on_text)  # type: ignore[arg-type]


def test_an_out_of_range_seed_is_refused_on_each_protocol_and_the_largest_one_samples(
    served: tuple[str, FastAPI],
) -> None:
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, seed=2**64, max_tokens=4)
    assert "seed" in str(refused.value)
    with pytest.raises(ollama.ResponseError) as refused_too:
        ollama.Client(host=url).chat(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                     options={"seed": 2**64, "num_predict": 4})
    assert refused_too.value.status_code == 400 and "seed" in str(refused_too.value)

    for seed in (2**64 - 1, -(2**63)):
        answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, seed=seed,
                                                temperature=0.8, max_tokens=4)
        assert answer.choices[0].finish_reason in {"stop", "length"}
    assert httpx.get(f"{url}/health/ready", timeout=30).status_code == 200


def test_rows_that_fail_in_the_engine_fail_alone_and_the_engine_goes_on(served: tuple[str, FastAPI]) -> None:
    url, app = served
    engine = _engine(app)
    alone = _job(app, GREEDY)
    engine.submit(alone)
    expected = alone.future.result(TIMEOUT_S).text

    def raising(_piece: str) -> None:
        raise RuntimeError("a streaming callback that breaks")

    # What an unchecked seed did before: torch refuses it when the row is admitted.
    too_large_seed = _job(app, GenerationParams(max_new_tokens=8, temperature=0.8, top_p=1.0, seed=2**64))
    breaking_stream = _job(app, GREEDY, on_text=raising)
    beside = _job(app, GREEDY)
    for job in (beside, too_large_seed, breaking_stream):
        engine.submit(job)

    for failed in (too_large_seed, breaking_stream):
        with pytest.raises(EngineFailureError) as error:
            failed.future.result(TIMEOUT_S)
        assert error.value.status_code == 500 and "other requests are unaffected" in error.value.message
    assert beside.future.result(TIMEOUT_S).text == expected

    answer = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT_S,
                        json={"model": "SmolLM2-135M-Instruct", "messages": QUESTION, "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    assert engine.problem() is None
    assert httpx.get(f"{url}/health/ready", timeout=30).status_code == 200


def test_a_dead_engine_is_reported_fails_fast_and_the_server_still_stops(
    tmp_path: Path, corpus_store: Path
) -> None:
    app = create_app(make_settings(tmp_path, vector_store_path=corpus_store))
    with running_server(app) as url:
        engine = _engine(app)

        def kill(_piece: str) -> None:
            raise _ThreadKiller()

        victim = _job(app, GREEDY, on_text=kill)
        engine.submit(victim)
        with pytest.raises(BackendUnavailableError):
            victim.future.result(TIMEOUT_S)

        ready = httpx.get(f"{url}/health/ready", timeout=30)
        assert ready.status_code == 503 and ready.json()["ready"] is False
        health = httpx.get(f"{url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["components"]["lora_model"] is False
        assert "engine stopped" in health.json()["details"]["components"]["lora_model"]

        started = time.monotonic()
        answer = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT_S,
                            json={"model": "SmolLM2-135M-Instruct", "messages": QUESTION, "max_tokens": 4})
        assert answer.status_code == 503 and "restart the server" in answer.json()["error"]["message"]
        ask = httpx.post(f"{url}/ask", json={"query": "What does a blue basket hold?"}, timeout=TIMEOUT_S)
        assert ask.status_code == 503
        assert time.monotonic() - started < 10  # at once, not at REQUEST_TIMEOUT_SECONDS
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 20  # the lifespan's close did not wait on the dead engine


def test_a_stuck_step_is_reported_and_closing_returns_within_its_bound(tmp_path: Path) -> None:
    backend = HFLoraBackend.load(make_settings(tmp_path, request_timeout_seconds=1.0))
    engine = backend._engine
    release = threading.Event()
    blocked = threading.Event()

    def hang(_piece: str) -> None:  # a step that does not end (released at the test's end)
        blocked.set()
        release.wait(TIMEOUT_S)

    stuck = GenerationJob(input_ids=backend.encode(QUESTION), params=GREEDY, adapter=BASE_MODEL, on_text=hang)
    queued = GenerationJob(input_ids=backend.encode(QUESTION), params=GREEDY, adapter=BASE_MODEL)
    try:
        engine.submit(stuck)
        assert blocked.wait(TIMEOUT_S)
        engine.submit(queued)
        deadline = time.monotonic() + 10
        while engine.problem() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "looks stuck" in (engine.problem() or "")
        assert not asyncio.run(backend.health()).ok

        started = time.monotonic()
        engine.close(timeout=2.0)
        assert time.monotonic() - started < 5
        for job in (stuck, queued):
            with pytest.raises(BackendUnavailableError):
                job.future.result(0)
        with pytest.raises(BackendUnavailableError):
            engine.submit(GenerationJob(input_ids=[1], params=GREEDY, adapter=BASE_MODEL))
    finally:
        release.set()
