"""Penalties on tokens already generated: OpenAI's presence_penalty and frequency_penalty, Ollama's repeat_penalty
and repeat_last_n, through the official clients on the local engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama as ollama_client
import openai
import pytest
import torch

from app.llm.base import Penalties
from app.llm.engine.rows.penalties import penalise
from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

LOOPING = "Write a short poem about the sea."  # SmolLM2 repeats one line of it when nothing stops it


def test_scores_go_down_by_presence_once_and_frequency_per_use_and_repeat_penalty_divides() -> None:
    scores = torch.tensor([2.0, 2.0, 2.0, -2.0, 2.0])
    penalise(scores, [1, 1, 3], Penalties(presence=0.5, frequency=0.25))
    assert scores.tolist() == [2.0, 2.0 - 0.5 - 0.5, 2.0, -2.0 - 0.5 - 0.25, 2.0]
    scores = torch.tensor([2.0, 2.0, 2.0, -2.0, 2.0])
    penalise(scores, [4, 1, 3], Penalties(repetition=2.0, last_n=2))  # token 4 is outside the last two
    assert scores.tolist() == [2.0, 1.0, 2.0, -4.0, 2.0]
    assert not Penalties().active and not Penalties(repetition=1.3, last_n=0).active


@pytest.fixture
def url(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> Iterator[str]:
    settings = make_settings(tmp_path, vector_store_path=corpus_store, ollama_base_url=ollama.base_url,
                             max_new_tokens=96, repetition_repeats=0)
    with running_server(create_app(settings)) as base_url:
        yield base_url


def _repeated_lines(text: str) -> int:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) - len(set(lines))


@pytest.mark.slow
@pytest.mark.numerics
def test_penalties_change_a_looping_answer_on_v1_and_api(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    messages: Any = [{"role": "user", "content": LOOPING}]

    def answer(**penalties: float) -> str:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=96, temperature=0,
                                               **penalties)  # type: ignore[arg-type]
        return reply.choices[0].message.content or ""

    plain = answer()
    assert _repeated_lines(plain) >= 2  # the precondition: unpenalised, it repeats itself
    assert answer() == plain  # greedy: the same again
    for penalised in (answer(frequency_penalty=1.0), answer(presence_penalty=1.5)):
        assert penalised != plain and _repeated_lines(penalised) < _repeated_lines(plain)

    api = ollama_client.Client(host=url, timeout=120)

    def api_answer(**options: float) -> str:
        reply = api.chat(model=model, messages=messages, options={"num_predict": 96, "temperature": 0, **options})
        return reply.message.content or ""

    assert api_answer() == plain
    assert api_answer(repeat_penalty=1.5) != plain
    assert api_answer(repeat_penalty=1.5, repeat_last_n=0) == plain  # a window of none: no penalty


def test_top_k_and_min_p_narrow_what_is_sampled() -> None:
    from app.llm.base import GenerationParams
    from app.llm.engine.rows.sampling import sample

    scores = torch.tensor([1.0, 3.0, 2.9, 0.5])
    hot = GenerationParams(8, temperature=2.0, top_p=1.0)
    draws = {sample(scores, hot, torch.Generator().manual_seed(seed)) for seed in range(200)}
    assert draws == {0, 1, 2, 3}  # hot enough that every token comes up
    for narrowed, allowed in (({"top_k": 1}, {1}), ({"top_k": 2}, {1, 2}), ({"min_p": 0.9}, {1, 2}),
                              ({"min_p": 1.0}, {1})):
        params = GenerationParams(8, temperature=2.0, top_p=1.0, **narrowed)  # type: ignore[arg-type]
        assert {sample(scores, params, torch.Generator().manual_seed(seed)) for seed in range(200)} == allowed


@pytest.mark.slow
def test_top_k_of_one_samples_the_greedy_answer_on_api_and_v1(url: str) -> None:
    question: Any = [{"role": "user", "content": "Name three colours."}]
    api = ollama_client.Client(host=url, timeout=120)
    greedy = api.chat(model="SmolLM2-135M-Instruct", messages=question,
                      options={"num_predict": 24, "temperature": 0}).message.content
    hot = api.chat(model="SmolLM2-135M-Instruct", messages=question,
                   options={"num_predict": 24, "temperature": 1.5, "top_k": 1, "seed": 7}).message.content
    assert hot == greedy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120, max_retries=0)
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, max_tokens=24,
                                           temperature=1.5, seed=7, extra_body={"top_k": 1})
    assert reply.choices[0].message.content == greedy
