"""Section 13: structured output (a reply held to a JSON Schema by llguidance's token mask) against free text, in this
process through the HF backend's own API, as the structured-output issue sets its targets:

a. Compiling: llguidance's one-time view of the tokenizer (SmolLM2's 49,152 tokens), then compiling a typical tool's
   parameters schema (each round a schema not seen before, so nothing is cached): median.
b. Decoding (SmolLM2, greedy, prefix cache off): a step's time is every gap between two streamed pieces.
   - batch 1: one row held to a schema whose one field is a long story, against the same prompt free;
   - batch 8: eight rows at once on adapters a..d, half of them held to the schema, against eight free rows.
   Rounds alternate the two variants, so a noisy moment hits both; the figure is the free rows' median gap over the
   constrained run's median gap (1.0: no cost; the target is at least 0.9).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from bench.common import ADAPTER_NAMES, Context, Row, SectionResult, ms, verdict
from bench.engine_bench import timed_request

SPEED_TARGET = 0.9  # a constrained row decodes at >= 0.9x a free one, at batch 1 and at batch 8
COMPILE_TARGET_S = 0.010  # a typical tool schema, after the tokenizer's one-time set-up
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook, as JSON with one key, "
                                     "story. Describe every step in great detail."}]
STORY_SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"],
                "additionalProperties": False}


def _tool_schema(number: int) -> dict[str, Any]:
    """A weather tool's parameters, as OpenAI's function-calling guide has it; `number` makes each one new."""
    return {"type": "object", "additionalProperties": False, "required": ["location", "unit"], "properties": {
        "location": {"type": "string", "description": f"City and country, e.g. Paris, France ({number})"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "include_hourly": {"type": "boolean"},
    }}


def _compiling(ctx: Context) -> tuple[dict[str, Any], list[Row]]:
    from transformers import AutoTokenizer

    from app.llm.base import OutputConstraint
    from app.llm.engine.loop import _eos_token_ids
    from app.llm.engine.rows.grammar import ConstraintCompiler

    tokenizer = AutoTokenizer.from_pretrained(ctx.base_model)
    compiler = ConstraintCompiler(tokenizer, _eos_token_ids(tokenizer))
    started = time.perf_counter()
    compiler.row(OutputConstraint("json_object"))
    setup_s = time.perf_counter() - started
    times = []
    for number in range(ctx.size(20, 3)):
        started = time.perf_counter()
        compiler.row(OutputConstraint.json_schema(_tool_schema(number)))
        times.append(time.perf_counter() - started)
    compile_s = statistics.median(times)
    rows = [Row("13 structured output", "llguidance's tokenizer set-up (once per process)", ms(setup_s)),
            Row("13 structured output", "compile a tool's parameters schema (median)", ms(compile_s),
                f"<= {ms(COMPILE_TARGET_S)}", verdict(compile_s <= COMPILE_TARGET_S))]
    return {"tokenizer_setup_s": setup_s, "compile_s": times}, rows


async def _batch(backend: Any, rows: int, constrained: int, tokens: int) -> list[float]:
    """`rows` requests at once on adapters a..d in turn, the first `constrained` held to the story schema: every
    gap between two pieces of every row."""
    from app.llm.base import OutputConstraint

    story = OutputConstraint.json_schema(STORY_SCHEMA)
    work = [timed_request(backend, STORY, tokens, ADAPTER_NAMES[row % len(ADAPTER_NAMES)],
                          constraint=story if row < constrained else None) for row in range(rows)]
    return [gap for timed in await asyncio.gather(*work) for gap in timed.gaps]


def _decoding(ctx: Context) -> tuple[dict[str, Any], list[Row]]:
    from app.llm.backends.hf import HFLoraBackend

    backend = HFLoraBackend.load(ctx.backend_settings(prefix_cache_mb=0, max_batch_size=8))
    tokens, rounds = ctx.size(64, 8), ctx.size(4, 1)
    data: dict[str, Any] = {}
    rows = []
    try:
        asyncio.run(_batch(backend, 8, 4, 4))  # warm-up: every adapter's first forward, the schema compiled
        for size in (1, 8):
            gaps: dict[str, list[float]] = {"free": [], "constrained": []}
            for _ in range(rounds):
                gaps["free"] += asyncio.run(_batch(backend, size, 0, tokens))
                gaps["constrained"] += asyncio.run(_batch(backend, size, max(1, size // 2), tokens))
            free, held = statistics.median(gaps["free"]), statistics.median(gaps["constrained"])
            data[f"batch_{size}"] = {"free_gap_s": free, "constrained_gap_s": held, "gaps": len(gaps["free"])}
            what = "one row held to a schema" if size == 1 else "8 rows, half held to a schema"
            rows.append(Row("13 structured output", f"decode step, {what}: free / constrained speed",
                            f"{free / held:.2f} ({ms(held)} vs {ms(free)} a step)", f">= {SPEED_TARGET}",
                            verdict(free / held >= SPEED_TARGET)))
    finally:
        asyncio.run(backend.close())
    return data, rows


def structured(ctx: Context) -> SectionResult:
    data: dict[str, Any] = {}
    rows: list[Row] = []
    for name, part in {"compiling": _compiling, "decoding": _decoding}.items():
        data[name], part_rows = part(ctx)
        rows += part_rows
    return SectionResult(13, "structured output", data, rows)
