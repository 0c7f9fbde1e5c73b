"""A client that goes away stops its generation at once (real SmolLM2 model): in the middle of a streamed
answer, while waiting for a non-streamed one, or while its request waits in a queue.

Few generation slots, a small queue and one row per batch: if an abandoned generation went on, the next
request would be refused as busy, or wait behind hundreds of tokens in the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from tests.conftest import make_settings, running_server

pytestmark = pytest.mark.slow

RAMBLE = {"temperature": 2.0, "top_p": 1.0}  # at 2.0 the model rambles on to its token limit
QUESTION = "Tell me everything about the orchards."
SHORT = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
         "temperature": 0}
LONG = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4000}
#: A 4-token answer takes well under this; one behind a 4000-token generation takes far longer.
PROMPT_SECONDS = 15


@pytest.fixture()
def cancellations(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="app.api.disconnect")
    return caplog


def _cancelled_routes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The route of each logged cancellation, sorted: requests that leave close together (a stream closed while
    another waits behind it) are noticed in either order."""
    return sorted(r.getMessage().split(":")[0] for r in caplog.records if "client disconnected" in r.getMessage())


def _short_answer(url: str, admitted_within: float) -> tuple[httpx.Response, float]:
    """A 4-token chat completion, tried again while the server answers 503 busy (it may take a moment to
    notice a closed socket) for up to `admitted_within` s; with how long the answered try took."""
    admitted_by = time.monotonic() + admitted_within
    while True:
        started = time.monotonic()
        answer = httpx.post(f"{url}/v1/chat/completions", json=SHORT, timeout=120)
        elapsed = time.monotonic() - started
        if answer.status_code != 503 or time.monotonic() > admitted_by:
            return answer, elapsed
        time.sleep(0.25)


def _waits_in_the_queue(url: str, path: str, body: dict[str, Any]) -> bool:
    """Whether the request is let in to wait for a slot (its client gives up after 1 s) rather than refused
    as busy; refusals are tried again for a few seconds, as the server may not have noticed the last client
    leave yet."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with httpx.stream("POST", f"{url}{path}", json=body, timeout=1) as answer:
                if answer.status_code != 503:  # answering, not waiting: no need to read the rest
                    return False
        except httpx.ReadTimeout:
            return True
        time.sleep(0.1)
    return False


@contextmanager
def _streaming_ask(url: str) -> Iterator[str]:
    """A streamed /ask read up to its first delta, which is yielded; its connection stays open, unread, until
    the block ends. (The line iterator must outlive the yield: closing it closes the connection.)"""
    with httpx.Client(base_url=url, timeout=120) as client, client.stream(
        "POST", "/ask", json={"query": QUESTION, "stream": True}
    ) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        while next(lines) != "event: delta":
            pass
        yield next(lines)


def test_closing_a_stream_stops_its_generation_and_frees_the_slot(
    tmp_path: Path, corpus_store: Path, cancellations: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        tmp_path, vector_store_path=corpus_store, max_concurrent_generations=1, max_queued_requests=0,
        max_batch_size=1, max_new_tokens=4000, **RAMBLE,
    )
    with running_server(create_app(settings)) as url:
        with _streaming_ask(url) as first_delta:
            pass
        # The client and its connection are closed here, after one delta.
        assert first_delta.startswith("data: ")
        answer, elapsed = _short_answer(url, admitted_within=5)
    assert answer.status_code == 200, answer.text  # not 503 busy: the slot was freed
    assert answer.json()["usage"]["completion_tokens"] <= 4
    assert elapsed < PROMPT_SECONDS, f"the next request waited {elapsed:.1f} s behind the abandoned generation"
    assert _cancelled_routes(cancellations) == ["POST /ask"]


def test_a_client_giving_up_on_a_non_streamed_answer_frees_the_slot_at_once(
    tmp_path: Path, corpus_store: Path, cancellations: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        tmp_path, vector_store_path=corpus_store, max_concurrent_generations=1, max_queued_requests=0,
        max_batch_size=1, max_new_tokens=400, **RAMBLE,
    )
    with running_server(create_app(settings)) as url:
        httpx.post(f"{url}/v1/chat/completions", json=SHORT, timeout=120)  # warm-up: the first one is slower
        started = time.monotonic()
        full = httpx.post(f"{url}/ask", json={"query": QUESTION}, timeout=600)
        full_seconds = time.monotonic() - started
        assert full.status_code == 200 and full.json()["usage"]["completion_tokens"] >= 300, full.text
        # The same question again, from a client that gives up a quarter of the way through.
        left = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/ask", json={"query": QUESTION}, timeout=full_seconds / 4)
        answer, _ = _short_answer(url, admitted_within=full_seconds / 2)
        answered = time.monotonic() - left
    assert answer.status_code == 200, answer.text  # not 503 busy: the slot was freed
    # Had the abandoned generation run on, the slot would have been busy for about `full_seconds`.
    assert answered < full_seconds * 0.75, f"answered {answered:.1f} s after; a full answer takes {full_seconds:.1f} s"
    assert _cancelled_routes(cancellations) == ["POST /ask"]


def test_requests_whose_clients_leave_while_queued_free_their_queue_place(
    tmp_path: Path, corpus_store: Path, cancellations: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        tmp_path, vector_store_path=corpus_store, max_concurrent_generations=1, max_queued_requests=1,
        max_batch_size=1, max_new_tokens=4000, **RAMBLE,
    )
    with running_server(create_app(settings)) as url:
        with _streaming_ask(url):  # the one slot generates for this stream from now on
            # Each request takes the one queue place and gives it back when its client leaves: were it kept,
            # the next one would be refused as busy. The second is streamed, so it leaves before its first piece.
            waited = [
                _waits_in_the_queue(url, "/v1/chat/completions", LONG),
                _waits_in_the_queue(url, "/ask", {"query": QUESTION, "stream": True}),
                _waits_in_the_queue(url, "/v1/chat/completions", LONG),
            ]
        answer, elapsed = _short_answer(url, admitted_within=5)
    assert waited == [True, True, True]
    assert answer.status_code == 200, answer.text
    assert elapsed < PROMPT_SECONDS, f"the next request waited {elapsed:.1f} s behind abandoned generations"
    assert _cancelled_routes(cancellations) == ["POST /ask"] * 2 + ["POST /v1/chat/completions"] * 2


def test_a_row_waiting_in_the_engine_is_dropped_when_its_client_leaves(
    tmp_path: Path, corpus_store: Path, cancellations: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        tmp_path, vector_store_path=corpus_store, max_concurrent_generations=2, max_queued_requests=0,
        max_batch_size=1, max_new_tokens=4000, **RAMBLE,
    )
    with running_server(create_app(settings)) as url:
        with _streaming_ask(url):  # the engine's one row generates for this stream from now on
            # The second slot lets this one in; its row waits in the engine behind the stream's.
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=1)
        # Once the stream is closed the engine goes on with the next row: this one's, unless the abandoned one
        # is dropped.
        answer, elapsed = _short_answer(url, admitted_within=5)
    assert answer.status_code == 200, answer.text
    assert elapsed < PROMPT_SECONDS, f"the next request waited {elapsed:.1f} s behind the abandoned generation"
    assert _cancelled_routes(cancellations) == ["POST /ask", "POST /v1/chat/completions"]
