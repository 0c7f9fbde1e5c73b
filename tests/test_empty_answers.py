"""An answer is never silently empty: end-of-turn may not be the first token (on an adapter trained to stop at
once), and an answer that is still blank says so, on /ask and /v1, streamed or not."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.llm.backends.hf import HFLoraBackend
from app.llm.base import EMPTY_ANSWER_NOTICE, GenerationParams
from app.llm.model_source import resolve_base_model
from app.main import create_app
from tests.adapter_training import QUESTIONS, train_word_adapter
from tests.conftest import make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

pytestmark = pytest.mark.slow

MESSAGES: Any = [{"role": "user", "content": QUESTIONS[0]}]


@pytest.fixture(scope="module")
def silent_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained to answer every question with end-of-turn and nothing else."""
    base = resolve_base_model("embedded:SmolLM2-135M-Instruct", None)
    return train_word_adapter(base, "", tmp_path_factory.mktemp("silent") / "silent", answer="<|im_end|>")


def test_an_adapter_that_prefers_to_stop_at_once_still_answers(silent_adapter: Path, tmp_path: Path) -> None:
    import torch

    backend = HFLoraBackend.load(make_settings(tmp_path, lora_model_path=silent_adapter))
    with torch.inference_mode():  # the precondition: its first choice really is end-of-turn
        logits = backend.adapters.model(torch.tensor([backend.encode(MESSAGES)])).logits[0, -1]
    assert backend._tokenizer.convert_ids_to_tokens(int(logits.argmax())) == "<|im_end|>"
    for temperature in (0.0, 0.7):
        params = GenerationParams(max_new_tokens=8, temperature=temperature, top_p=0.9)
        result = asyncio.run(backend.generate(MESSAGES, params))
        assert result.model_used == "lora" and result.completion_tokens >= 1


def test_a_blank_answer_says_so_on_ask_streamed_or_not(tmp_path: Path, corpus_store: Path) -> None:
    """A backend whose model answers with nothing (an Ollama model can): 200 with a notice, never a silent ''."""
    settings_overrides = {"vector_store_path": corpus_store, "use_lora_default": False}
    with OllamaWireServer(models=["qwen3:4b"], reply=lambda _model, _messages: "") as ollama, running_server(
        create_app(make_settings(tmp_path, ollama_base_url=ollama.base_url, **settings_overrides))
    ) as url:
        plain = httpx.post(f"{url}/ask", json={"query": "When does the first ferry leave?"}, timeout=60)
        streamed = httpx.post(f"{url}/ask", json={"query": "When does the first ferry leave?", "stream": True},
                              timeout=60)
    assert plain.status_code == 200 and plain.json()["answer"] == ""
    assert plain.json()["notice"] == EMPTY_ANSWER_NOTICE and plain.json()["finish_reason"] == "stop"
    done = json.loads(streamed.text.split("event: done\ndata: ")[1].split("\n")[0])
    assert done["answer"] == "" and done["notice"] == EMPTY_ANSWER_NOTICE


def test_a_blank_chat_completion_says_so_and_a_real_one_does_not(tmp_path: Path, corpus_store: Path) -> None:
    """On the real model: a stop string that matches the answer's first character leaves nothing to show."""
    body = {"model": "SmolLM2-135M-Instruct", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    with running_server(create_app(make_settings(tmp_path, vector_store_path=corpus_store))) as url:
        answered = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        first = answered["choices"][0]["message"]["content"].strip()[0]
        blank = httpx.post(f"{url}/v1/chat/completions", json={**body, "stop": [first]}, timeout=120).json()
        streamed = httpx.post(f"{url}/v1/chat/completions", json={**body, "stop": [first], "stream": True},
                              timeout=120).text
    assert "notice" not in answered
    assert blank["choices"][0]["message"]["content"].strip() == "" and blank["notice"] == EMPTY_ANSWER_NOTICE
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["notice"] == EMPTY_ANSWER_NOTICE
