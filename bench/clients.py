"""Concurrent HTTP clients of /ask that time each request: total latency and, when streaming, the time to
the first `delta` event (the SSE format of app/api/ask_router.py) and the gaps between `delta` events (the engine
streams a piece per generated token, but for a token that ends halfway through a character or a stop string: the
gaps are inter-token times, a held-back token adding its time to the next gap)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import httpx

from bench.common import distribution

QUESTIONS = (
    "How do I switch from the LoRA model to Ollama?",
    "Which settings control the vector store?",
    "How do I train my own adapter?",
    "What does the /health endpoint report?",
    "How are API keys configured?",
    "How do I add my own documents?",
    "What happens when the server is at capacity?",
    "How do I pick an adapter per request?",
)
CLIENT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


@dataclass(frozen=True)
class Outcome:
    """One request: HTTP status (None: no answer at all), seconds, seconds to the first piece when streamed, and
    the seconds between one streamed piece and the next."""

    status: int | None
    seconds: float
    first_piece_seconds: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""
    abandoned: bool = False  # the client hung up after the first piece, on purpose
    piece_gaps: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


def ask_payloads(count: int, adapters: Sequence[str | None]) -> list[dict[str, Any]]:
    """`count` /ask bodies, questions and adapters taken in turn (None: the server's default)."""
    payloads = []
    for index in range(count):
        payload: dict[str, Any] = {"query": QUESTIONS[index % len(QUESTIONS)]}
        adapter = adapters[index % len(adapters)] if adapters else None
        if adapter is not None:
            payload["adapter"] = adapter
        payloads.append(payload)
    return payloads


async def ask(client: httpx.AsyncClient, payload: dict[str, Any], stream: bool = False,
              headers: dict[str, str] | None = None, abandon: bool = False) -> Outcome:
    """POST /ask once; never raises for HTTP or connection trouble (it is recorded in the outcome).
    `abandon` (streamed only): hang up after the first piece, as a client that goes away does."""
    started = time.perf_counter()
    try:
        if not stream:
            response = await client.post("/ask", json=payload, headers=headers)
            usage = response.json().get("usage", {}) if response.status_code == 200 else {}
            return Outcome(response.status_code, time.perf_counter() - started, None,
                           usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0))
        return await _ask_streamed(client, {**payload, "stream": True}, headers, started, abandon)
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return Outcome(None, time.perf_counter() - started, error=f"{type(error).__name__}: {error}")


async def get(client: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None) -> Outcome:
    """GET `path` once; connection trouble is recorded, not raised."""
    return await call(client, "GET", path, headers)


async def call(client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str] | None = None,
               **request: Any) -> Outcome:
    """One request to any route, its whole body read (a stream to its end); connection trouble is recorded, not
    raised. A 200 whose streamed body carries an error (an OpenAI `data: {"error": ...}` event or an Ollama
    `{"error": ...}` line) is recorded with that error."""
    started = time.perf_counter()
    try:
        response = await client.request(method, path, headers=headers, **request)
    except httpx.HTTPError as failure:
        return Outcome(None, time.perf_counter() - started, error=f"{type(failure).__name__}: {failure}")
    streamed_error = ""
    if response.status_code == 200 and not response.headers.get("content-type", "").startswith("application/json"):
        streamed_error = next(filter(None, map(_streamed_error, response.text.splitlines())), "")
    return Outcome(response.status_code, time.perf_counter() - started, error=streamed_error)


def _streamed_error(line: str) -> str:
    """The error a streamed line reports (an SSE `data:` line or an NDJSON line), or ""."""
    try:
        event = json.loads(line.removeprefix("data: "))
    except json.JSONDecodeError:
        return ""
    return json.dumps(event["error"]) if isinstance(event, dict) and "error" in event else ""


async def _ask_streamed(client: httpx.AsyncClient, payload: dict[str, Any], headers: dict[str, str] | None,
                        started: float, abandon: bool) -> Outcome:
    first: float | None = None
    arrivals: list[float] = []  # perf_counter of each `delta` event
    event = ""
    usage: dict[str, int] = {}
    error = ""
    async with client.stream("POST", "/ask", json=payload, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return Outcome(response.status_code, time.perf_counter() - started)
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                if event == "delta":
                    arrivals.append(time.perf_counter())
                    if first is None:
                        first = arrivals[0] - started
                        if abandon:
                            return Outcome(200, first, first, abandoned=True)
                elif event == "done":
                    usage = json.loads(line.removeprefix("data: "))["usage"]
                elif event == "error":
                    error = line.removeprefix("data: ")
    gaps = tuple(later - earlier for earlier, later in pairwise(arrivals))
    return Outcome(200, time.perf_counter() - started, first, usage.get("completion_tokens", 0),
                   usage.get("prompt_tokens", 0), error, piece_gaps=gaps)


async def _run_clients(url: str, payloads: Sequence[dict[str, Any]], clients: int,
                       stream: bool) -> tuple[list[Outcome], float]:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    outcomes: list[Outcome] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            outcomes.append(await ask(client, queue.get_nowait(), stream))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    return outcomes, wall


def run_clients(url: str, payloads: Sequence[dict[str, Any]], clients: int,
                stream: bool = False) -> tuple[list[Outcome], float]:
    """`clients` concurrent clients working through `payloads` (each sends its next request when its last
    one is answered); the outcomes and the wall time of the whole run."""
    return asyncio.run(_run_clients(url, payloads, clients, stream))


def summarise(outcomes: Sequence[Outcome], wall: float) -> dict[str, Any]:
    """Requests/s, tokens/s, latency, time-to-first-piece and inter-token (every gap between two pieces of every
    request, pooled) distributions, status counts."""
    good = [outcome for outcome in outcomes if outcome.ok]
    first = [outcome.first_piece_seconds for outcome in good if outcome.first_piece_seconds is not None]
    gaps = [gap for outcome in good for gap in outcome.piece_gaps]
    return {
        "requests": len(outcomes),
        "ok": len(good),
        "statuses": dict(Counter(str(outcome.status) for outcome in outcomes)),
        "errors": sorted({outcome.error for outcome in outcomes if outcome.error})[:5],
        "wall_s": wall,
        "requests_per_s": len(good) / wall if wall else 0.0,
        "completion_tokens_per_s": sum(outcome.completion_tokens for outcome in good) / wall if wall else 0.0,
        "mean_prompt_tokens": statistics.fmean(o.prompt_tokens for o in good) if good else 0.0,
        "mean_completion_tokens": statistics.fmean(o.completion_tokens for o in good) if good else 0.0,
        "latency_s": distribution([outcome.seconds for outcome in good]),
        "first_piece_s": distribution(first),
        "inter_token_s": distribution(gaps),
    }
