"""Sections against the live server (uvicorn subprocess on loopback, HF backend, adapters a..d):
3. many clients on many adapters vs the same requests one by one;  7. /ask end to end, streamed, at 1 to 16 clients."""

from __future__ import annotations

from typing import Any

from bench.clients import ask_payloads, run_clients, summarise
from bench.common import ADAPTER_NAMES, Context, Row, SectionResult, ms, verdict
from bench.live_server import LiveServer, bench_env

CLIENTS = 8
STREAMING_CLIENTS = (1, 4, 8, 16)  # section 7
#: The engine issue's first-token targets (seconds, p50) at these client counts (section 7, adapters a..d in turn)
FIRST_TOKEN_TARGETS = {1: 1.5, 8: 2.0}
THROUGHPUT_TARGET = 4.0  # the engine issue's: CLIENTS clients on adapters a..d / the same requests one by one


def max_new_tokens(ctx: Context) -> int:
    return ctx.size(64, 8)


def live_server(ctx: Context) -> LiveServer:
    """One server for every live section of the run, started on first use, stopped when the run ends."""
    def start() -> LiveServer:
        adapters_dir = next(iter(ctx.adapters().values())).parent
        # Room for section 7's most clients at once, each decoding in the batch (section 3's 8 need no more).
        slots = max(CLIENTS, *STREAMING_CLIENTS)
        # No prefix cache: the 8 questions come back on the same adapters with the same passages, so after the
        # warm-up nearly every prompt would be answered from cached KV and these sections would time the cache
        # rather than batching and prefill (section 12 measures what the cache saves).
        env = bench_env(ctx.scratch, adapters_dir, MAX_NEW_TOKENS=max_new_tokens(ctx),
                        MAX_CONCURRENT_GENERATIONS=slots, MAX_BATCH_SIZE=slots, MAX_QUEUED_REQUESTS=64,
                        PREFIX_CACHE_MB=0)
        server = ctx.stack.enter_context(LiveServer(env, ctx.scratch / "server"))
        outcomes, _ = run_clients(server.url, ask_payloads(len(ADAPTER_NAMES), ADAPTER_NAMES), 1)  # warm-up
        if not all(outcome.ok for outcome in outcomes):
            raise RuntimeError(f"warm-up requests failed: {outcomes}\n{server.log_tail()}")
        return server

    server: LiveServer = ctx.shared("live_server", start)
    return server


def _latency(summary: dict[str, Any], key: str = "latency_s") -> str:
    stats = summary[key]
    return f"{ms(stats['p50'])} / {ms(stats['p95'])}" if stats else "-"


def _check(summary: dict[str, Any], what: str) -> None:
    if summary["ok"] != summary["requests"]:
        raise RuntimeError(f"{what}: {summary['requests'] - summary['ok']} requests failed: "
                           f"statuses {summary['statuses']}, errors {summary['errors']}")


def many_adapters(ctx: Context) -> SectionResult:
    """`CLIENTS` concurrent clients over adapters a..d vs the same requests sent one at a time."""
    server = live_server(ctx)
    payloads = ask_payloads(ctx.size(32, 8), ADAPTER_NAMES)
    # Streamed, so that one by one, the time to the first piece is a request's retrieval + prefill (P) and the
    # rest its decode (D): batching shares decode steps, not prefills, so (P + D) / P bounds its gain.
    sequential = summarise(*run_clients(server.url, payloads, 1, stream=True))
    concurrent = summarise(*run_clients(server.url, payloads, CLIENTS, stream=True))
    _check(sequential, "one by one")
    _check(concurrent, f"{CLIENTS} clients")
    ratio = concurrent["requests_per_s"] / sequential["requests_per_s"]
    bound = sequential["latency_s"]["mean"] / sequential["first_piece_s"]["mean"]
    data = {"requests": len(payloads), "clients": CLIENTS, "adapters": list(ADAPTER_NAMES),
            "max_new_tokens": max_new_tokens(ctx), "one_by_one": sequential, "concurrent": concurrent,
            "throughput_ratio": ratio, "prefill_bound": bound}
    note = f"{len(payloads)} /ask requests, adapters {','.join(ADAPTER_NAMES)} in turn, <= {max_new_tokens(ctx)} tokens"
    rows = [
        Row("3", "one by one: requests/s; latency p50 / p95",
            f"{sequential['requests_per_s']:.2f}; {_latency(sequential)}", note=note),
        Row("3", f"{CLIENTS} clients: requests/s; latency p50 / p95",
            f"{concurrent['requests_per_s']:.2f}; {_latency(concurrent)}",
            note=f"{concurrent['completion_tokens_per_s']:.1f} vs {sequential['completion_tokens_per_s']:.1f} "
                 f"generated tok/s; prompts {sequential['mean_prompt_tokens']:.0f} tokens on average"),
        Row("3", f"throughput {CLIENTS} clients / one by one", f"{ratio:.2f}x", f">= {THROUGHPUT_TARGET:.0f}x",
            verdict(ratio >= THROUGHPUT_TARGET),
            note=f"bound if prefills do not batch: (P + D) / P = {bound:.1f}x, P = "
                 f"{ms(sequential['first_piece_s']['mean'])} to the first piece one by one"),
    ]
    return SectionResult(3, "Many clients, many adapters", data, rows)


def ask_end_to_end(ctx: Context) -> SectionResult:
    """Streamed /ask at 1, 4, 8 and 16 clients over adapters a..d: time to the first piece (retrieval, queueing,
    prefill), the gaps between pieces (decode steps, stretched by other requests' prefill chunks), time to the end;
    the server's peak RSS."""
    server = live_server(ctx)
    per_client = ctx.size(3, 1)
    data: dict[str, Any] = {"max_new_tokens": max_new_tokens(ctx), "requests_per_client": per_client}
    rows = []
    for clients in STREAMING_CLIENTS:
        payloads = ask_payloads(max(clients * per_client, ctx.size(4, 1)), ADAPTER_NAMES)
        summary = summarise(*run_clients(server.url, payloads, clients, stream=True))
        _check(summary, f"{clients} streaming clients")
        data[f"clients_{clients}"] = summary
        gap, target = summary["inter_token_s"], FIRST_TOKEN_TARGETS.get(clients)
        rows.append(Row("7", f"/ask streamed, {clients} client{'s' if clients > 1 else ''}: first token p50 / p95; "
                        "inter-token p95; total p50 / p95",
                        f"{_latency(summary, 'first_piece_s')}; {ms(gap['p95']) if gap else '-'}; {_latency(summary)}",
                        f"first token p50 <= {target * 1000:.0f} ms" if target else "",
                        verdict(summary["first_piece_s"]["p50"] <= target) if target else "",
                        f"{summary['requests']} requests, {summary['requests_per_s']:.2f} req/s, prompts "
                        f"{summary['mean_prompt_tokens']:.0f} tokens on average"))
    memory = server.memory()
    data["server_memory_mb"] = memory
    rows.append(Row("7", "server peak RSS (VmHWM, whole run)", f"{memory['peak_rss_mb']:.0f} MiB",
                    note=f"now {memory['rss_mb']:.0f} MiB; model, embedder, store, 4 adapters"))
    return SectionResult(7, "/ask end to end", data, rows)
