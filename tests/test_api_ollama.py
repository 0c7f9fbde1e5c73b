"""The service on the Ollama backend, against a server that speaks Ollama's wire protocol.

These apps start on Ollama and never load the local model, so they are fast.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer


def _ollama_app_url(tmp_path: Path, corpus_store: Path, **overrides: object):  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, vector_store_path=corpus_store, use_lora_default=False, **overrides)
    return running_server(create_app(settings))


def test_ask_answers_through_ollama_with_retrieved_context(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    with _ollama_app_url(tmp_path, corpus_store, ollama_base_url=ollama.base_url) as url:
        response = httpx.post(f"{url}/ask", json={"query": "When does the first ferry leave?"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_used"] == "ollama"
    assert body["answer"] == 'Model qwen3:4b answers: you asked "When does the first ferry leave?".'
    assert body["source_documents"][0]["metadata"]["source"] == "corpus/ferries.html"
    chat = ollama.bodies("/api/chat")[-1]
    assert chat["model"] == "qwen3:4b"
    assert "06:40" in chat["messages"][0]["content"]  # the retrieved passage reached the model
    assert chat["options"]["num_predict"] == 24 and chat["options"]["temperature"] == 0.0


def test_ollama_down_gives_503_saying_what_to_run_and_health_unhealthy(tmp_path: Path, corpus_store: Path) -> None:
    with _ollama_app_url(tmp_path, corpus_store) as url:
        ask = httpx.post(f"{url}/ask", json={"query": "ferry?"}, timeout=60)
        health = httpx.get(f"{url}/health", timeout=30)
        ready = httpx.get(f"{url}/health/ready", timeout=30)
        live = httpx.get(f"{url}/health/live", timeout=30)
    assert ask.status_code == 503
    assert ask.json()["error"] == "backend_unavailable" and "ollama serve" in ask.json()["message"]
    assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    assert health.json()["components"]["ollama_service"] is False
    assert ready.status_code == 503 and live.status_code == 200


def test_missing_ollama_model_says_pull(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> None:
    with _ollama_app_url(tmp_path, corpus_store, ollama_base_url=ollama.base_url, ollama_model="llama9:70b") as url:
        ask = httpx.post(f"{url}/ask", json={"query": "ferry?"}, timeout=60)
        health = httpx.get(f"{url}/health", timeout=30).json()
    assert ask.status_code == 503 and "ollama pull llama9:70b" in ask.json()["message"]
    assert "ollama pull llama9:70b" in health["details"]["components"]["ollama_service"]


def test_ollama_answering_garbage_is_a_clean_503(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> None:
    ollama.garbage = True
    with _ollama_app_url(tmp_path, corpus_store, ollama_base_url=ollama.base_url) as url:
        ask = httpx.post(f"{url}/ask", json={"query": "ferry?"}, timeout=60)
    assert ask.status_code == 503 and ask.json()["error"] == "backend_unavailable"
    assert "Traceback" not in ask.text and "/" not in ask.json()["message"].split("at ")[0]


def test_slow_ollama_hits_the_read_timeout_as_504(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> None:
    ollama.token_delay = 2.0
    with _ollama_app_url(tmp_path, corpus_store, ollama_base_url=ollama.base_url, ollama_read_timeout=0.5) as url:
        ask = httpx.post(f"{url}/ask", json={"query": "ferry?"}, timeout=60)
    assert ask.status_code == 504 and ask.json()["error"] == "backend_timeout"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ('{"query": ""}', 422, "validation_error"),
        ('{"query": "   \\n "}', 422, "validation_error"),
        ('{"query": "' + "x" * 5000 + '"}', 422, "validation_error"),
        ('{"query": 5}', 422, "validation_error"),
        ('{"query": "ok", "use_lora": "yes"}', 422, "validation_error"),
        ("{}", 422, "validation_error"),
        ('{"query": "unterminated', 400, "invalid_json"),
        ("[]", 422, "validation_error"),
    ],
)
def test_bad_input_is_a_json_4xx(tmp_path: Path, corpus_store: Path, body: str, status: int, code: str) -> None:
    with _ollama_app_url(tmp_path, corpus_store) as url:
        response = httpx.post(f"{url}/ask", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"] == code and response.json()["message"]


def test_unknown_route_and_wrong_method_are_json(tmp_path: Path, corpus_store: Path) -> None:
    with _ollama_app_url(tmp_path, corpus_store) as url:
        missing = httpx.get(f"{url}/nope", timeout=30)
        wrong = httpx.get(f"{url}/ask", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"
    assert wrong.headers["Allow"] == "POST"  # RFC 9110: a 405 says which methods are allowed


def test_a_response_format_reaches_ollama_as_its_format_streamed_or_not(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    schema = {"type": "object", "properties": {"when": {"type": "string"}}, "required": ["when"]}
    as_json = {"type": "json_object"}
    as_schema = {"type": "json_schema", "json_schema": {"name": "ferry", "schema": schema}}
    with _ollama_app_url(tmp_path, corpus_store, ollama_base_url=ollama.base_url) as url:
        for response_format, stream in ((as_json, False), (as_schema, False), (as_schema, True)):
            body = {"query": "When does the first ferry leave?", "response_format": response_format, "stream": stream}
            assert httpx.post(f"{url}/ask", json=body, timeout=60).status_code == 200
    assert [chat["format"] for chat in ollama.bodies("/api/chat")] == ["json", schema, schema]
