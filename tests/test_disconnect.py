"""A client that goes away in the middle of a streamed answer stops its generation (real SmolLM2 model).

One generation at a time, nothing queued and one row per batch: if the abandoned generation went on, the
next request would be refused as busy, or wait behind thousands of tokens in the engine.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.conftest import make_settings, running_server

pytestmark = pytest.mark.slow


def test_closing_a_stream_stops_its_generation_and_frees_the_slot(tmp_path: Path, corpus_store: Path) -> None:
    settings = make_settings(
        tmp_path, vector_store_path=corpus_store, max_concurrent_generations=1, max_queued_requests=0,
        max_batch_size=1, max_new_tokens=4000, temperature=2.0, top_p=1.0,  # at 2.0 it rambles to the limit
    )
    with running_server(create_app(settings)) as url:
        with httpx.Client(base_url=url, timeout=120) as client, client.stream(
            "POST", "/ask", json={"query": "Tell me everything about the orchards.", "stream": True}
        ) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            while next(lines) != "event: delta":
                pass
            first_delta = next(lines)
        # The client and its connection are closed here, after one delta.
        assert first_delta.startswith("data: ")
        admitted_by = time.monotonic() + 5  # time for the server to notice the closed socket
        while True:
            started = time.monotonic()
            answer = httpx.post(
                f"{url}/v1/chat/completions", timeout=120,
                json={"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 4, "temperature": 0},
            )
            elapsed = time.monotonic() - started
            if answer.status_code != 503 or time.monotonic() > admitted_by:
                break
            time.sleep(0.25)
    assert answer.status_code == 200, answer.text  # not 503 busy: the slot was freed
    assert answer.json()["usage"]["completion_tokens"] <= 4
    assert elapsed < 15, f"the next request waited {elapsed:.1f} s behind the abandoned generation"
