"""Text is never broken: a character split over several tokens (Chinese, emoji) is shown only once complete, on
the engine's every surface, streamed or not; half a character at the end of a budget is dropped, not U+FFFD."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama as ollama_client
import openai
import pytest

from app.config import EMBEDDED_BASE_MODEL
from app.llm.engine.rows.detokenize import IncrementalDetokenizer
from app.llm.model_source import resolve_base_model
from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

MIXED = "灯塔管理员每天午夜换班 🙂 then English, 再见。"
QUESTION = "灯塔管理员什么时候换班？请用中文回答。"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(EMBEDDED_BASE_MODEL, None))


def test_pieces_are_whole_characters_and_join_to_the_text(tokenizer: Any) -> None:
    ids = tokenizer(MIXED, add_special_tokens=False).input_ids
    # The precondition: SmolLM2's tokens split these characters (the naive decode of a prefix shows U+FFFD).
    assert sum("\ufffd" in tokenizer.decode(ids[:cut]) for cut in range(1, len(ids))) >= 5
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in ids]
    assert "".join(pieces) == detokenizer.text == MIXED
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # a token that only starts a character gives nothing yet


def test_a_budget_that_ends_mid_character_drops_the_half(tokenizer: Any) -> None:
    ids = tokenizer(MIXED, add_special_tokens=False).input_ids
    for cut in range(1, len(ids)):
        detokenizer = IncrementalDetokenizer(tokenizer)
        for token in ids[:cut]:
            detokenizer.add(token)
        assert "\ufffd" not in detokenizer.text and MIXED.startswith(detokenizer.text)
        assert len(detokenizer.text) >= len(tokenizer.decode(ids[:cut]).rstrip("\ufffd")) - 1


def test_bytes_that_never_make_a_character_are_dropped(tokenizer: Any) -> None:
    first_byte_of_a_character = tokenizer("灯", add_special_tokens=False).input_ids[0]
    assert tokenizer.decode([first_byte_of_a_character]) == "\ufffd"
    detokenizer = IncrementalDetokenizer(tokenizer)
    for token in [first_byte_of_a_character, *tokenizer(" and on", add_special_tokens=False).input_ids]:
        detokenizer.add(token)
    assert detokenizer.text == " and on"


@pytest.fixture
def url(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> Iterator[str]:
    settings = make_settings(tmp_path, vector_store_path=corpus_store, ollama_base_url=ollama.base_url)
    with running_server(create_app(settings)) as base_url:
        yield base_url


@pytest.mark.slow
def test_chinese_answers_are_whole_on_v1_api_and_ask_streamed_or_not(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    messages: Any = [{"role": "user", "content": QUESTION}]
    answers = []
    for budget in range(1, 9):  # cuts after each token: several fall inside a character
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=budget, temperature=0)
        text = whole.choices[0].message.content or ""
        pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=model, messages=messages, max_tokens=budget, temperature=0, stream=True) if chunk.choices]
        assert "\ufffd" not in text and not any("\ufffd" in piece for piece in pieces), (budget, text, pieces)
        assert "".join(pieces) == text
        answers.append(text)
    assert any("\u4e00" <= character <= "\u9fff" for character in answers[-1])  # it did answer in Chinese
    assert all(answers[-1].startswith(answer) for answer in answers)  # each budget's text a prefix of the next's
    api = ollama_client.Client(host=url, timeout=120)
    reply = api.chat(model=model, messages=messages, options={"num_predict": 5, "temperature": 0})
    streamed = "".join(part.message.content or "" for part in api.chat(
        model=model, messages=messages, options={"num_predict": 5, "temperature": 0}, stream=True))
    assert "\ufffd" not in (reply.message.content or "") and "\ufffd" not in streamed
    asked = httpx.post(f"{url}/ask", json={"query": QUESTION}, timeout=120)
    assert asked.status_code == 200 and "\ufffd" not in asked.json()["answer"]
