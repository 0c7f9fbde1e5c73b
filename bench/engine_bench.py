"""Section 12: continuous batching, chunked prefill and the prefix cache, in this process through the HF backend's
own API (`HFLoraBackend.generate` with a streaming callback, the path /ask takes), timing each streamed piece as it
reaches the event loop. Prompts are RAG-shaped: the service's own template (`app.rag.prompts.build_messages`) around
passages of bench/data/corpus, cut to about 715 tokens (what /ask's prompts are, sections 3 and 7).

a. Stream gap (SmolLM2, adapters a and b): a greedy stream on adapter `a` runs a few tokens alone, then a RAG
   prompt on `b` arrives. Its prefill runs one PREFILL_CHUNK_TOKENS chunk between two of the stream's decode steps,
   so each gap of the stream meanwhile is a chunk plus a step. Measured: the stream's inter-token p95 from the
   newcomer's arrival to the stream's first piece after the newcomer's first token (that gap holds the last chunk)
   over its p95 alone, before the arrival; and the newcomer's time to first token. At PREFILL_CHUNK_TOKENS 32, 64,
   128 and 256, one backend each, rounds interleaved so a noisy moment hits every size alike.
b. Prefix cache (SmolLM2): per round, a RAG request, then one on the same adapter with the same passages and
   another question, then one with other passages (only the template and system prompt shared), each timed to
   its first token, with PREFIX_CACHE_MB=256 and with 0 (one backend each, paired per round).
c. Qwen2.5-1.5B-shaped model (section 11's random weights): 1, 4, 8 and 16 clients sending one request each at
   once: time to first token p50 / p95, inter-token p95 over every gap of every request (--quick: 1 and 4 clients,
   128-token prompts).

(a) and (c) run with the prefix cache off, so that every request prefills its whole prompt whatever ran before it;
(b) measures what the cache saves.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from typing import Any

from bench.clients import QUESTIONS
from bench.common import ADAPTER_NAMES, REPO_ROOT, Context, Row, SectionResult, distribution, ms, verdict
from bench.qwen_shaped_bench import PROMPT_TOKENS, qwen_shaped_folder

CORPUS = REPO_ROOT / "bench" / "data" / "corpus" / "en"
#: A greedy answer that runs far past any budget set here (a stream must outlast a newcomer's whole prefill).
STREAM_MESSAGES = [{"role": "user", "content": "Count from 1 to 500, separated by commas."}]
CHUNK_SIZES = (32, 64, 128, 256)
CLIENT_COUNTS = (1, 4, 8, 16)  # c; a smoke run (--quick) takes the first two
GAP_TARGET = 3.0  # the engine issue's: a stream's gap p95 while a prompt prefills <= 3x its gap alone
REUSE_TARGET = 0.30  # TTFT of a second request on the same adapter and passages at least 30% lower with the cache
FIRST_TOKEN_TARGET_S = 1.5  # one client, first token of a RAG answer


@dataclass
class Timed:
    """One request's times (perf_counter): when it was sent and when each streamed piece arrived."""

    sent: float
    pieces: list[float] = field(default_factory=list)
    answered: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def first_s(self) -> float:
        """Seconds to the first piece (to the answer when no piece was streamed: a one-token answer that decoded
        to nothing)."""
        return (self.pieces[0] if self.pieces else self.answered) - self.sent

    @property
    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in pairwise(self.pieces)]


async def timed_request(backend: Any, messages: list[Any], tokens: int, adapter: str | None,
                        on_piece: Callable[[Timed], None] | None = None, constraint: Any = None) -> Timed:
    """One greedy request of at most `tokens` tokens on `adapter` (None: the base model), streamed and timed; with
    `constraint` (an OutputConstraint), held to it."""
    from app.llm.base import GenerationParams

    timed = Timed(time.perf_counter())

    def arrived(_piece: str) -> None:
        timed.pieces.append(time.perf_counter())
        if on_piece is not None:
            on_piece(timed)

    params = GenerationParams(max_new_tokens=tokens, temperature=0.0, top_p=1.0, constraint=constraint)
    result = await backend.generate(messages, params, ((adapter, 1.0),) if adapter else (), arrived)
    timed.answered = time.perf_counter()
    timed.prompt_tokens, timed.completion_tokens = result.prompt_tokens, result.completion_tokens
    return timed


@cache
def _passages() -> tuple[tuple[str, str], ...]:
    """(file name, text) of each English document of the bench corpus (each shorter than a 500-character chunk)."""
    return tuple((path.name, path.read_text(encoding="utf-8").strip()) for path in sorted(CORPUS.glob("*.md")))


def rag_messages(backend: Any, question: str, start: int, tokens: int) -> list[Any]:
    """/ask's prompt for `question` around the corpus's passages taken in turn from the `start`-th, the last one
    cut so that the prompt (as the backend encodes it) is at most `tokens` tokens."""
    from app.rag.prompts import build_messages
    from app.rag.vector_store import SearchHit, StoredChunk

    def hits_with(hits: list[SearchHit], source: str, text: str) -> list[SearchHit]:
        return [*hits, SearchHit(len(hits), StoredChunk(text, {"source": source}), 1.0, "cosine")]

    def length(hits: list[SearchHit]) -> int:
        return len(backend.encode(build_messages(question, hits)))

    passages = _passages()
    hits: list[SearchHit] = []
    for offset in range(len(passages)):
        source, text = passages[(start + offset) % len(passages)]
        if length(hits_with(hits, source, text)) <= tokens:
            hits = hits_with(hits, source, text)
            continue
        low, high = 0, len(text)  # the longest beginning of this passage that still fits
        while low < high:
            middle = (low + high + 1) // 2
            if length(hits_with(hits, source, text[:middle])) <= tokens:
                low = middle
            else:
                high = middle - 1
        if low:
            hits = hits_with(hits, source, text[:low])
        break
    return build_messages(question, hits)


def _load(ctx: Context, **settings: Any) -> Any:
    from app.llm.backends.hf import HFLoraBackend

    return HFLoraBackend.load(ctx.backend_settings(**settings))


def _close(*backends: Any) -> None:
    for backend in backends:
        asyncio.run(backend.close())


# -- a. a running stream while a prompt prefills -------------------------------------------------------------------


async def _stream_and_newcomer(backend: Any, newcomer: list[Any], lead: int, chunk: int) -> dict[str, Any]:
    """The stream (adapter a) alone for `lead` pieces, then the newcomer's prompt (adapter b, two tokens)."""
    prompt_tokens = len(backend.encode(newcomer))
    # Enough tokens to outlast the newcomer's prefill (one chunk a step, and a step to pick it up) by a few.
    budget = lead + math.ceil(prompt_tokens / chunk) + 6
    alone = asyncio.Event()
    stream = asyncio.ensure_future(timed_request(
        backend, STREAM_MESSAGES, budget, "a", lambda timed: alone.set() if len(timed.pieces) > lead else None))
    waiter = asyncio.ensure_future(alone.wait())
    await asyncio.wait({stream, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if stream.done():
        raise RuntimeError(f"the stream ended after {stream.result().completion_tokens} tokens, before the newcomer")
    arrival = time.perf_counter()
    newcomer_timed = await timed_request(backend, newcomer, 2, "b")
    running = await stream
    newcomer_first = newcomer_timed.pieces[0] if newcomer_timed.pieces else newcomer_timed.answered
    pieces = running.pieces
    after = next((index for index, at in enumerate(pieces) if at > newcomer_first), None)
    if after is None:
        raise RuntimeError(f"the stream ended after {running.completion_tokens} tokens, during the newcomer's prefill")
    since = next(index for index, at in enumerate(pieces) if at > arrival)
    return {"alone_s": [b - a for a, b in pairwise(pieces[: lead + 1])],
            "during_s": [pieces[index] - pieces[index - 1] for index in range(since, after + 1)],
            "newcomer_first_s": newcomer_first - arrival, "newcomer_prompt_tokens": newcomer_timed.prompt_tokens,
            "stream_tokens": running.completion_tokens}


def _stream_gaps(ctx: Context, default_chunk: int) -> tuple[dict[str, Any], list[Row]]:
    rounds, lead = ctx.size(4, 1), ctx.size(8, 4)
    backends = {chunk: _load(ctx, prefill_chunk_tokens=chunk, prefix_cache_mb=0) for chunk in CHUNK_SIZES}
    runs: dict[int, list[dict[str, Any]]] = {chunk: [] for chunk in CHUNK_SIZES}
    try:
        for backend in backends.values():
            asyncio.run(timed_request(backend, STREAM_MESSAGES, 4, "a"))  # warm-up: both adapters' first forwards
            asyncio.run(timed_request(backend, STREAM_MESSAGES, 4, "b"))
        for index in range(rounds):  # interleaved: a noisy moment hits every chunk size alike
            for chunk, backend in backends.items():
                newcomer = rag_messages(backend, QUESTIONS[index % len(QUESTIONS)], index, PROMPT_TOKENS)
                runs[chunk].append(asyncio.run(_stream_and_newcomer(backend, newcomer, lead, chunk)))
    finally:
        _close(*backends.values())
    data: dict[str, Any] = {"rounds": rounds, "lead_tokens": lead, "runs": {str(c): r for c, r in runs.items()}}
    rows = []
    for chunk, trials in runs.items():
        alone = distribution([gap for trial in trials for gap in trial["alone_s"]])
        during = distribution([gap for trial in trials for gap in trial["during_s"]])
        ratio = during["p95"] / alone["p95"]
        newcomer_first = statistics.median(trial["newcomer_first_s"] for trial in trials)
        prompt = trials[0]["newcomer_prompt_tokens"]
        data[f"chunk_{chunk}"] = {"alone_s": alone, "during_prefill_s": during, "ratio_p95": ratio,
                                  "newcomer_first_s": newcomer_first, "newcomer_prompt_tokens": prompt}
        default = chunk == default_chunk
        rows.append(Row(
            "12", f"PREFILL_CHUNK_TOKENS={chunk}{' (default)' if default else ''}: a stream's inter-token p95 while a "
            f"{prompt}-token prompt prefills / alone; the newcomer's first token",
            f"{ms(during['p95'])} / {ms(alone['p95'])} = {ratio:.1f}x; {ms(newcomer_first)}",
            f"<= {GAP_TARGET:.0f}x" if default else "", verdict(ratio <= GAP_TARGET) if default else "",
            f"SmolLM2, stream on a, newcomer on b; {during['n']} gaps during prefills, {alone['n']} alone, "
            f"{rounds} round{'s' if rounds > 1 else ''}; newcomer's first token: median, from its arrival"))
    return data, rows


# -- b. the prefix cache --------------------------------------------------------------------------------------------


async def _reuse_round(backend: Any, adapter: str, index: int, tokens: int) -> dict[str, Any]:
    """A RAG request, one with the same passages and another question, one with other passages; first tokens."""
    stats = backend.describe()["prefix_cache"]
    times: dict[str, Any] = {}
    # Passages from 2 * index and 2 * index + 1 on: no earlier round's prompt began with either.
    prompts = {"first": rag_messages(backend, QUESTIONS[0], 2 * index, tokens),
               "same_passages": rag_messages(backend, QUESTIONS[1], 2 * index, tokens),
               "other_passages": rag_messages(backend, QUESTIONS[2], 2 * index + 1, tokens)}
    for name, messages in prompts.items():
        timed = await timed_request(backend, messages, 1, adapter)
        after = backend.describe()["prefix_cache"]
        times[name] = {"first_s": timed.first_s, "prompt_tokens": timed.prompt_tokens,
                       "reused_tokens": after["reused_tokens"] - stats["reused_tokens"]}
        stats = after
    return times


def _prefix_cache(ctx: Context) -> tuple[dict[str, Any], list[Row]]:
    rounds = ctx.size(4, 1)  # at most 5: each round's prompts begin with two of the corpus's 10 passages
    backends = {"on": _load(ctx, prefix_cache_mb=256), "off": _load(ctx, prefix_cache_mb=0)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in backends}
    try:
        adapters = [ADAPTER_NAMES[index % len(ADAPTER_NAMES)] for index in range(rounds)]  # one a round
        for backend in backends.values():
            for adapter in sorted(set(adapters)):  # warm-up, on a prompt sharing only the chat template's start
                asyncio.run(timed_request(backend, STREAM_MESSAGES, 2, adapter))
        for index, adapter in enumerate(adapters):  # paired: each round on both backends, in turn
            for name, backend in backends.items():
                runs[name].append(asyncio.run(_reuse_round(backend, adapter, index, PROMPT_TOKENS)))
        stats = backends["on"].describe()["prefix_cache"]
    finally:
        _close(*backends.values())
    data: dict[str, Any] = {"rounds": rounds, "runs": runs, "cache_stats": stats}

    def median(name: str, request: str, key: str = "first_s") -> float:
        return statistics.median(run[request][key] for run in runs[name])

    def saving(request: str) -> float:  # paired per round
        return 1 - statistics.median(on[request]["first_s"] / off[request]["first_s"]
                                     for on, off in zip(runs["on"], runs["off"], strict=True))

    first_off = median("off", "first")
    same, other = saving("same_passages"), saving("other_passages")
    data.update(first_token_no_reuse_s=first_off, same_passages_saving=same, other_passages_saving=other)
    prompt = runs["off"][0]["first"]["prompt_tokens"]
    rows = [
        Row("12", f"first token, a {prompt}-token RAG prompt, one client, nothing to reuse (PREFIX_CACHE_MB=0)",
            ms(first_off), f"<= {FIRST_TOKEN_TARGET_S * 1000:.0f} ms", verdict(first_off <= FIRST_TOKEN_TARGET_S),
            f"SmolLM2, median of {rounds}; the prompt only, no retrieval (section 7 has /ask's)"),
        Row("12", "prefix cache: next request, same adapter and passages, another question: first token 256 MB / 0",
            f"{ms(median('on', 'same_passages'))} / {ms(median('off', 'same_passages'))} ({_lower(same)})",
            f">= {REUSE_TARGET:.0%} lower", verdict(same >= REUSE_TARGET),
            f"reused {median('on', 'same_passages', 'reused_tokens'):.0f} of {prompt} tokens; "
            f"median of {rounds} rounds' paired ratios, one adapter a round"),
        Row("12", "prefix cache: next request, same adapter, other passages: first token 256 MB / 0",
            f"{ms(median('on', 'other_passages'))} / {ms(median('off', 'other_passages'))} ({_lower(other)})", "", "",
            f"reused {median('on', 'other_passages', 'reused_tokens'):.0f} tokens (template and system prompt); "
            f"cache after the run: {stats['entries']} entries, {stats['bytes'] / 2**20:.0f} MiB, "
            f"{stats['hits']} hits of {stats['lookups']} lookups"),
    ]
    return data, rows


def _lower(saving: float) -> str:
    return f"{saving:.0%} lower" if saving >= 0 else f"{-saving:.0%} higher"


# -- c. many clients on the Qwen2.5-1.5B-shaped model ---------------------------------------------------------------


async def _clients(backend: Any, clients: int, prompt_tokens: int, tokens: int) -> list[Timed]:
    """`clients` requests sent at once, each its own question and passages."""
    return list(await asyncio.gather(*(
        timed_request(backend, rag_messages(backend, QUESTIONS[index % len(QUESTIONS)], index, prompt_tokens), tokens,
                      None)
        for index in range(clients))))


def _keep_tokens_in_vocabulary(backend: Any, folder: str) -> int:
    """Zero the tied embedding rows of the ids SmolLM2's tokenizer lacks: the random model would pick them two times
    in three, and they decode to nothing, so little would stream; a zero row scores 0, below the best of ~49k random
    scores. The matmul keeps its size, so a token costs what it did. Returns the vocabulary kept."""
    import torch
    from transformers import AutoTokenizer

    kept = len(AutoTokenizer.from_pretrained(folder))
    with torch.no_grad():
        backend.adapters.model.get_output_embeddings().weight[kept:] = 0
    return kept


def _qwen_clients(ctx: Context) -> tuple[dict[str, Any], list[Row]]:
    tokens = ctx.size(16, 4)
    # Every prompt is prefilled whole (cache off), one after another: 1 + 4 + 8 + 16 prompts of ~715 tokens are about
    # 2 minutes of this model on 2 cores, plus the decode steps between their chunks. A smoke run's prompts fit one
    # default chunk, and it stops at 4 clients.
    prompt_tokens = ctx.size(PROMPT_TOKENS, 128)
    counts = CLIENT_COUNTS if not ctx.quick else CLIENT_COUNTS[:2]
    folder = str(qwen_shaped_folder(ctx))
    backend = _load(ctx, base_model_name=folder, lora_adapters="", prefix_cache_mb=0,
                    max_batch_size=max(CLIENT_COUNTS))
    data: dict[str, Any] = {"max_new_tokens": tokens, "prompt_tokens_target": prompt_tokens}
    rows = []
    try:
        data["vocabulary_kept"] = _keep_tokens_in_vocabulary(backend, folder)
        asyncio.run(timed_request(backend, STREAM_MESSAGES, 2, None))  # warm-up
        dtype = backend.facts.numerics.dtype
        short = "" if prompt_tokens == PROMPT_TOKENS else f" (--quick; {PROMPT_TOKENS} in a full run)"
        for clients in counts:
            started = time.perf_counter()
            timed = asyncio.run(_clients(backend, clients, prompt_tokens, tokens))
            wall = time.perf_counter() - started
            first = distribution([request.first_s for request in timed])
            gaps = distribution([gap for request in timed for gap in request.gaps])
            prompt = statistics.fmean(request.prompt_tokens for request in timed)
            generated = sum(request.completion_tokens for request in timed)
            data[f"clients_{clients}"] = {"first_token_s": first, "inter_token_s": gaps, "wall_s": wall,
                                          "mean_prompt_tokens": prompt, "completion_tokens": generated}
            rows.append(Row(
                "12", f"Qwen2.5-1.5B-shaped, {clients} client{'s' if clients > 1 else ''} at once: first token "
                "p50 / p95; inter-token p95",
                f"{ms(first['p50'])} / {ms(first['p95'])}; {ms(gaps['p95']) if gaps else '-'}", "", "",
                f"in process, {dtype}, batch <= {max(CLIENT_COUNTS)}, greedy <= {tokens} tokens after "
                f"{prompt:.0f}-token prompts{short}; {generated} tokens in {wall:.0f} s"))
    finally:
        _close(backend)
    return data, rows


def engine(ctx: Context) -> SectionResult:
    from app.config import Settings

    default_chunk = Settings.model_fields["prefill_chunk_tokens"].default
    parts = {"stream_gap": lambda: _stream_gaps(ctx, default_chunk), "prefix_cache": lambda: _prefix_cache(ctx),
             "qwen_shaped_clients": lambda: _qwen_clients(ctx)}
    data: dict[str, Any] = {"chunk_sizes": list(CHUNK_SIZES), "seconds": {}}
    rows: list[Row] = []
    for name, part in parts.items():
        started = time.perf_counter()
        data[name], part_rows = part()
        data["seconds"][name] = round(time.perf_counter() - started, 1)
        rows += part_rows
    return SectionResult(12, "continuous batching, chunked prefill, prefix cache", data, rows)
