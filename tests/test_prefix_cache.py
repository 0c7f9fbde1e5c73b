"""The prompt KV kept for reuse (PREFIX_CACHE_MB), on the real SmolLM2 model: a prompt that begins like an
earlier one on the same weights skips that part of its prefill and answers exactly as without the cache; KV is
never shared across adapters, nor across two loads of an adapter under one name; memory stays within its bound."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from app.llm.backends.hf import HFLoraBackend
from app.llm.base import AdapterSpec, GenerationParams
from app.llm.model_source import resolve_base_model
from tests.conftest import make_settings
from tests.test_adapters import _save_lora

pytestmark = [pytest.mark.slow, pytest.mark.numerics]

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, top_p=1.0)
SYSTEM = "You answer questions about the user's documents. Use only the passages below. " * 3


def _messages(question: str) -> Any:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("prefix-adapters")
    source = resolve_base_model("embedded:SmolLM2-135M-Instruct", None)
    return {name: _save_lora(AutoModelForCausalLM.from_pretrained(source), folder / name, seed, scale=0.2)
            for name, seed in (("first", 21), ("second", 22))}


CHUNK = 16  # PREFILL_CHUNK_TOKENS: KV is reused in whole chunks


def _backend(tmp_path: Path, **overrides: Any) -> HFLoraBackend:
    return HFLoraBackend.load(make_settings(tmp_path, numeric_path="float32", prefill_chunk_tokens=CHUNK, **overrides))


def _answer(backend: HFLoraBackend, question: str, spec: AdapterSpec | None = ()) -> str:
    return asyncio.run(backend.generate(_messages(question), GREEDY, spec)).text


def _stats(backend: HFLoraBackend) -> dict[str, int]:
    stats: dict[str, int] = backend.describe()["prefix_cache"]
    return stats


def test_a_prompt_that_begins_alike_reuses_the_kv_and_answers_as_without_it(tmp_path: Path) -> None:
    uncached = _backend(tmp_path / "off", prefix_cache_mb=0)
    expected = {q: _answer(uncached, q) for q in ("Which fruit is red?", "Where do lemons grow?")}
    assert _stats(uncached)["entries"] == 0
    asyncio.run(uncached.close())

    backend = _backend(tmp_path / "on")
    red, lemons = (backend.encode(_messages(question)) for question in ("Which fruit is red?", "Where do lemons grow?"))
    prompt = len(red)
    assert _answer(backend, "Which fruit is red?") == expected["Which fruit is red?"]
    assert _stats(backend)["hits"] == 0
    assert _answer(backend, "Which fruit is red?") == expected["Which fruit is red?"]
    again = _stats(backend)
    # Whole chunks, short of the last token (its logits give the first answer token).
    assert again["hits"] == 1 and again["reused_tokens"] == (prompt - 1) // CHUNK * CHUNK
    assert _answer(backend, "Where do lemons grow?") == expected["Where do lemons grow?"]
    other = _stats(backend)
    shared = other["reused_tokens"] - again["reused_tokens"]
    # The whole chunks of the template and system prompt, up to where the questions differ.
    assert other["hits"] == 2 and shared == len(os.path.commonprefix([red, lemons])) // CHUNK * CHUNK > 40
    asyncio.run(backend.close())


def test_kv_is_never_reused_across_adapters_or_two_loads_of_one_name(
    tmp_path: Path, adapters: dict[str, Path]
) -> None:
    question = "Which fruit is red?"
    uncached = _backend(tmp_path / "off", prefix_cache_mb=0)
    asyncio.run(uncached.load_adapter("x", adapters["second"]))
    second_expected = _answer(uncached, question, (("x", 1.0),))
    asyncio.run(uncached.close())

    backend = _backend(tmp_path / "on")
    base = _answer(backend, question)
    asyncio.run(backend.load_adapter("x", adapters["first"]))
    first = _answer(backend, question, (("x", 1.0),))
    assert first != base and _stats(backend)["hits"] == 0  # the base model's KV is not the adapter's
    asyncio.run(backend.unload_adapter("x"))
    asyncio.run(backend.load_adapter("x", adapters["second"]))
    second = _answer(backend, question, (("x", 1.0),))
    assert _stats(backend)["hits"] == 0  # the same name loaded again: its former KV is not reused
    assert second == second_expected and second != first
    assert _answer(backend, question, (("x", 1.0),)) == second and _stats(backend)["hits"] == 1
    asyncio.run(backend.close())


def test_memory_stays_within_its_bound_the_least_recently_used_leaving_first(tmp_path: Path) -> None:
    backend = _backend(tmp_path, prefix_cache_mb=6)
    for question in ("Which fruit is red?", "Where do lemons grow?", "How heavy is a melon?", "Why are figs sweet?"):
        _answer(backend, question)
        stats = _stats(backend)
        assert 0 < stats["bytes"] <= 6 * 2**20
    assert stats["entries"] < 4  # SmolLM2's float32 KV is about 46 KB a token: not all four prompts fit
    asyncio.run(backend.close())
