"""Bounded load on the live server: twice its capacity for a while, and what must hold under it.

    python bench/load.py                   # 60 s; capacity 2 generating + 2 queued, 8 clients, one over its rate limit
    python bench/load.py --duration 20     # shorter
    python bench/load.py --minutes 30      # the soak: /ask, /v1, /api, embeddings, predictions and uploads mixed

The server (start_lora_rag.py on loopback, HF backend, adapters a..d, API keys) admits MAX_CONCURRENT_GENERATIONS
+ MAX_QUEUED_REQUESTS requests at once; the clients (2x that many, each with its own key, half of them streaming,
every 3rd answered stream abandoned after its first piece) ask without pause, and wait --busy-pause seconds
after a 503. One more client calls GET /model_info ~20 times a second, far over RATE_LIMIT_PER_MINUTE.
With --mix (on by default with --minutes) the load clients take the routes in turn: /ask, /v1/chat/completions,
/api/chat, /v1/embeddings and /api/v1/inference/predict (the shipped demo classifier), and one admin client
uploads a document, asks about it and deletes it again, over and over.
Checks (exit status 1 when one fails): only 2xx, 4xx-by-design (429) and 503 answers; every request answered (no
connection errors, no streamed `error` event); 503s seen (more clients than capacity) and 429s for the client over
its limit; the server still ready afterwards; its RSS, sampled every second, ends within --flat-tolerance of its
level after the warm-up (--warmup seconds, and at least until the prefix cache has filled to PREFIX_CACHE_MB: the
server's RSS grows by what that cache holds until then, by design). Results: markdown on stdout, JSON in
bench/results/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from app.config import EMBEDDED_EMBEDDING_MODEL  # noqa: E402
from bench.clients import CLIENT_TIMEOUT, QUESTIONS, Outcome, ask, ask_payloads, call, get  # noqa: E402
from bench.common import (  # noqa: E402
    ADAPTER_NAMES,
    REPO_ROOT,
    RESULTS_DIR,
    Context,
    distribution,
    machine,
    ms,
    process_memory_mb,
)
from bench.live_server import LiveServer, bench_env  # noqa: E402

ALLOWED = {429, 503}
PROBE_INTERVAL = 0.05
ABANDON_EVERY = 3  # a streaming client hangs up after the first piece of every 3rd answered request
GENERATING = ("ask", "v1", "api")  # the routes that share the engine's admission bound
MIXED = (*GENERATING, "embeddings", "predict")  # what a --mix load client asks, in turn
CLASSIFIER = "demo-intent"  # shipped in classifiers/
DOCUMENT_PAUSE = 2.0  # seconds between the document client's upload-ask-delete rounds
MONITOR_INTERVAL = 5.0  # seconds between two looks at the prefix cache
MONITOR_KEY = "bench-load-monitor"


class Recorder:
    def __init__(self) -> None:
        self.routes: dict[str, list[Outcome]] = {}  # route kind -> outcomes, in order
        self.rss: list[tuple[float, float]] = []
        self.prefix_cache: list[tuple[float, int, int]] = []  # (seconds, bytes held, its bound)

    def add(self, route: str, outcome: Outcome) -> None:
        self.routes.setdefault(route, []).append(outcome)

    def of(self, *routes: str) -> list[Outcome]:
        return [outcome for route in routes for outcome in self.routes.get(route, [])]

    @property
    def everything(self) -> list[Outcome]:
        return [outcome for outcomes in self.routes.values() for outcome in outcomes]


async def _mixed_request(client: httpx.AsyncClient, route: str, turn: int, stream: bool,
                         headers: dict[str, str]) -> Outcome:
    """One request of `route` (not /ask) as a client of that protocol sends it; `turn` picks question and adapter."""
    question, adapter = QUESTIONS[turn % len(QUESTIONS)], ADAPTER_NAMES[turn % len(ADAPTER_NAMES)]
    messages = [{"role": "user", "content": question}]
    if route == "v1":
        body = {"model": adapter, "messages": messages, "max_tokens": 16, "stream": stream,
                "presence_penalty": 0.5, "top_k": 20}
        return await call(client, "POST", "/v1/chat/completions", headers, json=body)
    if route == "api":
        body = {"model": adapter, "messages": messages, "stream": stream,
                "options": {"num_predict": 16, "repeat_penalty": 1.1}}
        return await call(client, "POST", "/api/chat", headers, json=body)
    if route == "embeddings":
        body = {"model": EMBEDDED_EMBEDDING_MODEL.removeprefix("embedded:"), "input": [*QUESTIONS] * 8}
        return await call(client, "POST", "/v1/embeddings", headers, json=body)
    body = {"model_id": CLASSIFIER, "texts": [*QUESTIONS] * 4, "batch_size": 8}
    return await call(client, "POST", "/api/v1/inference/predict", headers, json=body)


async def _load_client(client: httpx.AsyncClient, key: str, number: int, deadline: float, args: argparse.Namespace,
                       recorder: Recorder) -> None:
    payloads = ask_payloads(len(ADAPTER_NAMES) * 2, ADAPTER_NAMES)
    stream = number % 2 == 0
    headers = {"Authorization": f"Bearer {key}"}
    sent = answered = 0
    while time.monotonic() < deadline:
        route = MIXED[(number + sent) % len(MIXED)] if args.mix else "ask"
        if route == "ask":
            abandon = stream and answered % ABANDON_EVERY == ABANDON_EVERY - 1
            outcome = await ask(client, payloads[(number + sent) % len(payloads)], stream, headers, abandon)
        else:
            outcome = await _mixed_request(client, route, number + sent, stream, headers)
        sent += 1
        answered += outcome.status == 200 and route == "ask"
        recorder.add(route, outcome)
        if outcome.status in ALLOWED:
            await asyncio.sleep(args.busy_pause)


async def _document_client(client: httpx.AsyncClient, key: str, deadline: float, recorder: Recorder) -> None:
    """Upload a document of its own, ask about it in its collection, delete it with its stored copies; again."""
    headers = {"Authorization": f"Bearer {key}"}
    rounds = 0
    while time.monotonic() < deadline:
        text = f"# Soak note {rounds}\n\nThe soak's round {rounds} keeps the number {rounds * 7919} on file.\n"
        files = {"file": (f"soak-{rounds}.md", text.encode(), "text/markdown")}
        uploaded = await call(client, "POST", "/documents", headers, files=files, data={"collection": "soak"})
        recorder.add("upload", uploaded)
        if uploaded.status in (200, 201):
            recorder.add("ask", await ask(client, {"query": f"Which number does round {rounds} keep?",
                                                   "collection": "soak"}, headers=headers))
            listed = await client.get("/documents", params={"collection": "soak"}, headers=headers)
            for document in listed.json().get("documents", []) if listed.status_code == 200 else []:
                recorder.add("delete", await call(client, "DELETE", f"/documents/{document['document_id']}",
                                                  headers, params={"purge": "true"}))
        rounds += 1
        await asyncio.sleep(DOCUMENT_PAUSE)


async def _probe_client(client: httpx.AsyncClient, key: str, deadline: float, recorder: Recorder) -> None:
    while time.monotonic() < deadline:
        recorder.add("probe", await get(client, "/model_info", {"Authorization": f"Bearer {key}"}))
        await asyncio.sleep(PROBE_INTERVAL)


async def _sample_rss(pid: int, started: float, stop: asyncio.Event, recorder: Recorder) -> None:
    while not stop.is_set():
        try:
            recorder.rss.append((time.monotonic() - started, process_memory_mb(pid)["rss_mb"]))
        except OSError:  # the server is gone: the requests' outcomes say so
            return
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            pass


async def _sample_prefix_cache(client: httpx.AsyncClient, key: str, started: float, stop: asyncio.Event,
                               recorder: Recorder) -> None:
    """The prefix cache's bytes every MONITOR_INTERVAL s (/model_info): it fills up to PREFIX_CACHE_MB under load,
    and until it is full the server's RSS grows by what it holds."""
    while not stop.is_set():
        try:
            info = (await client.get("/model_info", headers={"Authorization": f"Bearer {key}"})).json()
            cache = info.get("prefix_cache") or {}
            recorder.prefix_cache.append((time.monotonic() - started, cache.get("bytes", 0), cache.get("max_bytes", 0)))
        except (httpx.HTTPError, ValueError):
            pass
        try:
            await asyncio.wait_for(stop.wait(), timeout=MONITOR_INTERVAL)
        except TimeoutError:
            pass


async def drive(server: LiveServer, keys: list[str], probe_key: str | None, admin_key: str | None,
                args: argparse.Namespace) -> Recorder:
    recorder = Recorder()
    limits = httpx.Limits(max_connections=len(keys) + 3, max_keepalive_connections=len(keys) + 3)
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT, limits=limits) as client:
        started = time.monotonic()
        deadline = started + args.duration
        stop = asyncio.Event()
        sampler = asyncio.gather(_sample_rss(server.pid, started, stop, recorder),
                                 _sample_prefix_cache(client, MONITOR_KEY, started, stop, recorder))
        tasks = [_load_client(client, key, number, deadline, args, recorder) for number, key in enumerate(keys)]
        if probe_key:
            tasks.append(_probe_client(client, probe_key, deadline, recorder))
        if admin_key:
            tasks.append(_document_client(client, admin_key, deadline, recorder))
        await asyncio.gather(*tasks)  # in-flight requests finish: nothing is cut off at the deadline
        stop.set()
        await sampler
    return recorder


def evaluate(recorder: Recorder, ready_after: bool, over_capacity: bool,
             args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    everything = recorder.everything
    generations = recorder.of(*GENERATING)
    statuses = Counter(str(outcome.status) for outcome in everything)
    lost = [outcome for outcome in everything if outcome.status is None]
    stream_errors = [outcome for outcome in everything if outcome.status == 200 and outcome.error]
    bad = {status: count for status, count in statuses.items()
           if status != "None" and not (200 <= int(status) < 300 or int(status) in ALLOWED)}
    samples = [rss for _, rss in recorder.rss]
    # The warm-up lasts --warmup seconds, and until the prefix cache has filled to its bound: RSS grows by what the
    # cache holds until then (bounded by PREFIX_CACHE_MB), which is not a leak.
    filled = next((at for at, held, bound in recorder.prefix_cache if bound and held >= 0.9 * bound), None)
    warmup = max(args.warmup, filled or 0.0)
    warm = next((rss for at, rss in recorder.rss if at >= warmup), samples[-1] if samples else 0.0)
    memory = {"first_mb": samples[0] if samples else 0.0, "after_warmup_mb": warm,
              "last_mb": samples[-1] if samples else 0.0, "max_mb": max(samples, default=0.0),
              "samples": len(samples)}
    growth = (memory["last_mb"] - warm) / warm if warm else 0.0
    answered = [outcome for outcome in recorder.of("ask") if outcome.ok and not outcome.abandoned]
    report = {
        "requests_sent": len(everything),
        "responses_received": len(everything) - len(lost),
        "statuses": dict(statuses),
        "route_statuses": {route: dict(Counter(str(outcome.status) for outcome in outcomes))
                           for route, outcomes in recorder.routes.items()},
        "generation_statuses": dict(Counter(str(outcome.status) for outcome in generations)),
        "abandoned_streams": sum(outcome.abandoned for outcome in everything),
        "connection_errors": sorted({outcome.error for outcome in lost})[:5],
        "stream_errors": [outcome.error for outcome in stream_errors][:5],
        "ask_latency_s": distribution([outcome.seconds for outcome in answered]),
        "rss": memory,
        "warmup_s": warmup,
        "prefix_cache_filled_s": filled,
        "prefix_cache_last": recorder.prefix_cache[-1] if recorder.prefix_cache else None,
        "rss_growth_after_warmup": growth,
        "rss_timeline": recorder.rss,
        "ready_after": ready_after,
    }
    failures = []
    if bad:
        failures.append(f"statuses other than 2xx/429/503: {bad}")
    if lost:
        failures.append(f"{len(lost)} requests got no answer: {report['connection_errors']}")
    if stream_errors:
        failures.append(f"{len(stream_errors)} streams ended in an error event: {report['stream_errors']}")
    if abs(growth) > args.flat_tolerance:
        failures.append(f"RSS moved {growth:+.0%} after the warm-up (limit {args.flat_tolerance:.0%})")
    if not ready_after:
        failures.append("the server was not ready after the load")
    if not answered:
        failures.append("no /ask request was answered at all")
    allowed = args.rate_limit * (1 + args.duration / 60)  # a full bucket, then the refill
    probes = recorder.of("probe")
    if args.rate_limit and len(probes) > 1.1 * allowed and not report["route_statuses"].get("probe", {}).get("429"):
        failures.append(f"{len(probes)} requests from one key, over RATE_LIMIT_PER_MINUTE, and no 429")
    succeeded = {route for route, outcomes in recorder.routes.items()
                 if any(outcome.status is not None and 200 <= outcome.status < 300 for outcome in outcomes)}
    if args.mix and not succeeded >= {*MIXED, "upload", "delete"}:
        failures.append(f"a route of the mix was never answered: {report['route_statuses']}")
    if over_capacity and not report["generation_statuses"].get("503"):
        failures.append("more clients than the capacity, yet no 503: the admission bound did not act")
    return report, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--minutes", type=float, help="minutes of load instead: the soak (--mix, warm-up 120 s)")
    parser.add_argument("--mix", action="store_true", help="every route, not only /ask (on with --minutes)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="MAX_CONCURRENT_GENERATIONS of the server")
    parser.add_argument("--max-queued", type=int, default=2, help="MAX_QUEUED_REQUESTS of the server")
    parser.add_argument("--clients", type=int, help="load clients (default: 2 x (max-concurrent + max-queued))")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rate-limit", type=int, default=120, help="RATE_LIMIT_PER_MINUTE of the server, per key")
    parser.add_argument("--no-probe", action="store_true", help="no client over its rate limit")
    parser.add_argument("--busy-pause", type=float, default=1.0, help="seconds a client waits after a 503/429")
    parser.add_argument("--warmup", type=float, default=15.0,
                        help="seconds before the RSS level is taken, at the least (it is taken once the prefix cache "
                        "is full: PREFIX_CACHE_MB is memory the server fills by design)")
    parser.add_argument("--flat-tolerance", type=float, default=0.10, help="allowed RSS change after the warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "load.json")
    args = parser.parse_args()
    if args.minutes:
        args.duration, args.mix, args.warmup = args.minutes * 60, True, max(args.warmup, 120.0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on SIGTERM too
    capacity = args.max_concurrent + args.max_queued
    clients = args.clients or 2 * capacity
    keys = [f"bench-load-{number}" for number in range(clients)]
    probe_key = None if args.no_probe else "bench-rate-probe"
    admin_key = "bench-load-admin" if args.mix else None

    with tempfile.TemporaryDirectory(prefix="lora-rag-load-") as scratch:
        context = Context(quick=False, scratch=Path(scratch))
        adapters_dir = next(iter(context.adapters().values())).parent
        env = bench_env(context.scratch, adapters_dir,
                        API_KEYS=",".join(keys + ([probe_key] if probe_key else []) + [MONITOR_KEY]),
                        RATE_LIMIT_PER_MINUTE=args.rate_limit, MAX_CONCURRENT_GENERATIONS=args.max_concurrent,
                        MAX_QUEUED_REQUESTS=args.max_queued, MAX_BATCH_SIZE=args.max_concurrent,
                        MAX_NEW_TOKENS=args.max_new_tokens, ADMIN_API_KEYS=admin_key or "",
                        CLASSIFIER_MODELS_PATH=REPO_ROOT / "classifiers")
        print(f"starting the server (capacity {args.max_concurrent} + {args.max_queued}) ...", flush=True)
        with LiveServer(env, context.scratch / "server") as server:
            print(f"load: {clients} clients for {args.duration:.0f} s"
                  f"{', plus one client over its rate limit' if probe_key else ''}", flush=True)
            if args.mix:
                loaded = httpx.post(f"{server.url}/api/v1/inference/models/load", json={"model_dir": CLASSIFIER},
                                    headers={"Authorization": f"Bearer {admin_key}"}, timeout=120)
                loaded.raise_for_status()
            recorder = asyncio.run(drive(server, keys, probe_key, admin_key, args))
            try:
                ready_after = httpx.get(f"{server.url}/health/ready", timeout=30).status_code == 200
            except httpx.HTTPError:
                ready_after = False
            peak = server.memory()["peak_rss_mb"]
    report, failures = evaluate(recorder, ready_after, clients > capacity, args)
    report.update(duration_s=args.duration, clients=clients, capacity=capacity, rate_limit_per_minute=args.rate_limit,
                  peak_rss_mb=peak, machine=machine(), command="python bench/load.py " + " ".join(sys.argv[1:]),
                  failures=failures)
    rss = report["rss"]
    latency = report["ask_latency_s"]
    filled_at = report["prefix_cache_filled_s"]
    warmup_text = (f"{report['warmup_s']:.0f} s (prefix cache full at "
                   f"{'never' if filled_at is None else f'{filled_at:.0f} s'})")
    print(f"\n| measure | value |\n|---|---|\n"
          f"| load | {clients} clients for {args.duration:.0f} s on capacity {capacity}"
          f" ({args.max_concurrent} generating + {args.max_queued} queued) |\n"
          f"| requests sent / answered | {report['requests_sent']} / {report['responses_received']} |\n"
          + "".join(f"| {route} statuses | {counts} |\n" for route, counts in report["route_statuses"].items())
          + f"| streams abandoned on purpose | {report['abandoned_streams']} |\n"
          f"| /ask answered: latency p50 / p95 | "
          f"{ms(latency['p50']) + ' / ' + ms(latency['p95']) if latency else '-'} |\n"
          f"| server RSS first / after warm-up / last / max | {rss['first_mb']:.0f} / {rss['after_warmup_mb']:.0f} / "
          f"{rss['last_mb']:.0f} / {rss['max_mb']:.0f} MiB ({report['rss_growth_after_warmup']:+.1%} after warm-up) |\n"
          f"| warm-up (--warmup, and until the prefix cache filled) | {warmup_text} |\n"
          f"| ready after the load | {ready_after} |\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"written: {args.out}")
    for failure in failures:
        print(f"FAILED: {failure}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
