"""The remote backend, against a real OpenAI-compatible engine on loopback: a second lora-rag serving the real
SmolLM2 with the shipped demo adapter (it speaks /v1/chat/completions and /v1/models as vLLM does)."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from app.main import create_app
from tests.conftest import REPO_ROOT, closed_port, make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

QUESTION = {"query": "How much does a flat tyre repair cost?"}


@contextmanager
def _engine(tmp_path: Path, corpus_store: Path, **overrides: Any) -> Iterator[str]:
    """The remote engine: lora-rag on the local model with the demo adapter, named `default` there."""
    values: dict[str, Any] = {"vector_store_path": corpus_store, "lora_model_path": REPO_ROOT / "lora_adapters",
                              "default_adapter": "", "max_new_tokens": 16}
    settings = make_settings(tmp_path / "engine", **{**values, **overrides})
    with running_server(create_app(settings)) as url:
        yield url


def _front(tmp_path: Path, corpus_store: Path, remote: str, **overrides: Any) -> Any:
    store = tmp_path / "front-store"
    shutil.copytree(corpus_store, store)
    values: dict[str, Any] = {"vector_store_path": store, "default_backend": "remote",
                              "remote_base_url": f"{remote}/v1", "remote_retries": 1, "max_new_tokens": 16}
    return create_app(make_settings(tmp_path / "front", **{**values, **overrides}))


def _sse(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.mark.slow
def test_a_front_end_on_the_remote_engine_answers_with_its_adapters_switches_and_reports_it_down(
    tmp_path: Path, corpus_store: Path
) -> None:
    with ExitStack() as engine_running:
        engine = engine_running.enter_context(_engine(tmp_path, corpus_store))
        with running_server(_front(tmp_path, corpus_store, engine)) as front, \
                httpx.Client(base_url=front, timeout=180) as client:
            health = client.get("/health")
            info = client.get("/model_info").json()
            base = client.post("/ask", json=QUESTION)
            adapted = client.post("/ask", json={**QUESTION, "adapter": "default"})
            direct = httpx.post(f"{engine}/ask", json={**QUESTION, "adapter": "default"}, timeout=180).json()
            streamed = client.post("/ask", json={**QUESTION, "adapter": "default", "stream": True})
            unknown = client.post("/ask", json={**QUESTION, "adapter": "nope"})
            mix = client.post("/ask", json={**QUESTION, "adapters": [{"name": "default", "weight": 0.5}]})
            to_lora = client.post("/switch_model", json={"backend": "lora"})
            on_lora = client.post("/ask", json=QUESTION)
            back = client.post("/switch_model", json={"backend": "remote"})
            unknown_backend = client.post("/switch_model", json={"backend": "vllm"})
            per_request = client.post("/ask", json={**QUESTION, "backend": "lora"})
            models = client.get("/v1/models").json()
            chat = client.post("/v1/chat/completions", json={
                "model": "default", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]})
            chat_direct = httpx.post(f"{engine}/v1/chat/completions", timeout=180, json={
                "model": "default", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}).json()
            engine_running.close()  # the engine goes down while the front end runs
            down = client.post("/ask", json=QUESTION)
            health_down = client.get("/health")
    assert health.status_code == 200, health.text
    assert health.json()["components"]["remote_service"] is True
    assert info["active_backend"] == "remote" and "remote" in info["backends"]
    assert base.status_code == 200, base.text
    assert base.json()["model_used"] == "remote" and base.json()["adapters"] == ""
    assert any(s["metadata"]["source"].endswith("bicycles.txt") for s in base.json()["source_documents"])
    assert adapted.status_code == 200 and adapted.json()["adapters"] == "default"
    assert adapted.json()["answer"] != base.json()["answer"]  # the adapter really ran on the engine
    assert adapted.json()["answer"] == direct["answer"]  # the same prompt as the engine's own /ask builds
    events = _sse(streamed)
    assert [name for name, _ in events].count("delta") >= 2 and events[-1][0] == "done"
    assert "".join(data["delta"] for name, data in events if name == "delta") == adapted.json()["answer"]
    assert events[-1][1]["model_used"] == "remote"
    assert unknown.status_code == 404 and unknown.json()["error"] == "adapter_not_found"
    assert "default" in unknown.json()["message"]
    assert mix.status_code == 422 and "remote backend" in mix.json()["message"]
    assert to_lora.status_code == 200 and to_lora.json()["active_backend"] == "lora"
    assert on_lora.json()["model_used"] == "base"  # the front end's own model, no adapter of its own
    assert back.json()["active_backend"] == "remote"
    assert unknown_backend.status_code == 404 and "lora, ollama, remote" in unknown_backend.json()["message"]
    assert per_request.json()["model_used"] == "base"
    assert [entry["id"] for entry in models["data"]] == ["SmolLM2-135M-Instruct", "default"]  # the engine's
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == chat_direct["choices"][0]["message"]["content"]
    assert down.status_code == 503 and down.json()["error"] == "backend_unavailable"
    assert health_down.status_code == 503 and health_down.json()["components"]["remote_service"] is False


@pytest.mark.slow
def test_response_formats_tools_and_logprobs_are_passed_to_the_remote_engine(
    tmp_path: Path, corpus_store: Path
) -> None:
    schema = {"type": "object", "properties": {"cost": {"type": "string", "maxLength": 12}}, "required": ["cost"],
              "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "repair", "schema": schema, "strict": True}}
    with _engine(tmp_path, corpus_store, max_new_tokens=48) as engine, \
            running_server(_front(tmp_path, corpus_store, engine, max_new_tokens=48)) as front:
        asked = httpx.post(f"{front}/ask", json={**QUESTION, "response_format": response_format}, timeout=180)
        chat = httpx.post(f"{front}/v1/chat/completions", timeout=180, json={
            "model": "default", "messages": [{"role": "user", "content": "Is it cheap?"}],
            "response_format": response_format})
        tool = {"type": "function", "function": {"name": "repair_cost", "parameters": schema}}
        called = httpx.post(f"{front}/v1/chat/completions", timeout=180, json={
            "model": "default", "messages": [{"role": "user", "content": "Is it cheap?"}], "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "repair_cost"}}, "stream": True})
        scored = httpx.post(f"{front}/v1/chat/completions", timeout=180, json={
            "model": "default", "messages": [{"role": "user", "content": "Is it cheap?"}], "max_tokens": 6,
            "logprobs": True, "top_logprobs": 2})
    assert asked.status_code == 200, asked.text
    assert set(json.loads(asked.json()["answer"])) == {"cost"} and asked.json()["model_used"] == "remote"
    assert chat.status_code == 200, chat.text
    assert set(json.loads(chat.json()["choices"][0]["message"]["content"])) == {"cost"}
    chunks = [json.loads(line[6:]) for line in called.text.splitlines() if line.startswith("data: {")]
    calls = [call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "repair_cost" and calls[0]["id"]  # the engine's own call id
    assert set(json.loads("".join(call["function"]["arguments"] for call in calls))) == {"cost"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    scores = scored.json()["choices"][0]["logprobs"]["content"]  # the engine's, read and passed on
    assert len(scores) == scored.json()["usage"]["completion_tokens"]
    assert all(entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2 and entry["bytes"] for entry in scores)


@pytest.mark.slow
def test_admin_adapter_loads_go_to_the_engine_when_the_remote_backend_is_active(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    with _engine(tmp_path, corpus_store, adapter_allowed_roots=str(REPO_ROOT)) as engine, \
            running_server(_front(tmp_path, corpus_store, engine)) as front, \
            httpx.Client(base_url=front, timeout=180) as client:
        loaded = client.post("/v1/load_lora_adapter",
                             json={"lora_name": "second", "lora_path": str(REPO_ROOT / "lora_adapters")})
        listed = client.get("/admin/adapters").json()
        answer = client.post("/ask", json={**QUESTION, "adapter": "second"})
        engine_models = [m["id"] for m in httpx.get(f"{engine}/v1/models", timeout=30).json()["data"]]
        unloaded = client.post("/admin/unload-lora-adapter", json={"lora_name": "second"})
        gone = client.post("/ask", json={**QUESTION, "adapter": "second"})
        unknown = client.post("/admin/unload-lora-adapter", json={"lora_name": "never-loaded"})
    assert loaded.status_code == 200, loaded.text
    assert "second" in engine_models  # loaded there, not into the front end's model
    assert {entry["name"] for entry in listed["adapters"]} == {"default", "second"}
    assert answer.status_code == 200 and answer.json()["adapters"] == "second"
    assert unloaded.status_code == 200 and gone.status_code == 404
    assert unknown.status_code == 404
    # An engine without runtime adapter loading (here Ollama's protocol: its router answers 404 page not found).
    with running_server(_front(tmp_path / "plain", corpus_store, ollama.base_url)) as front:
        refused = httpx.post(f"{front}/admin/load-lora-adapter", timeout=60,
                             json={"lora_name": "x", "lora_path": "/adapters/x"})
    assert refused.status_code == 501 and refused.json()["error"] == "not_supported"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in refused.json()["message"]


@pytest.mark.slow
def test_a_remote_engine_that_is_down_is_a_503_and_an_unhealthy_service(tmp_path: Path, corpus_store: Path) -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    with running_server(_front(tmp_path, corpus_store, down)) as url, httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/ask", json=QUESTION)
        health = client.get("/health")
        ready = client.get("/health/ready")
    assert answer.status_code == 503 and answer.json()["error"] == "backend_unavailable"
    assert down in answer.json()["message"] and "Traceback" not in answer.text
    assert health.status_code == 503 and health.json()["components"]["remote_service"] is False
    assert ready.status_code == 503


def test_without_remote_base_url_there_is_no_remote_backend(tmp_path: Path, corpus_store: Path) -> None:
    settings = make_settings(tmp_path, vector_store_path=corpus_store, use_lora_default=False)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        health = client.get("/health").json()
        switched = client.post("/switch_model", json={"backend": "remote"})
        both = client.post("/ask", json={**QUESTION, "backend": "lora", "use_lora": True})
    assert "remote_service" not in health["components"]
    assert switched.status_code == 404 and "REMOTE_BASE_URL" in switched.json()["message"]
    assert both.status_code == 422 and "not both" in both.json()["message"]


class _RunawayEngine(BaseHTTPRequestHandler):
    """An OpenAI-compatible engine that never stops: /v1/models as usual, then a chat reply declaring 10 GB, or a
    stream of one-token pieces without end. It counts what it managed to send before the reader hung up (and stops
    by itself at 64 MB, so a broken reader cannot make the test run away too)."""

    sent: ClassVar[dict[str, int]] = {}
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "runaway", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        streamed = bool(request.get("stream"))
        self.send_response(200)
        if streamed:
            self.send_header("Content-Type", "text/event-stream")
            event = {"id": "c", "object": "chat.completion.chunk", "model": "runaway",
                     "choices": [{"index": 0, "delta": {"content": "la "}, "finish_reason": None}]}
            block = f"data: {json.dumps(event)}\n\n".encode() * 64
        else:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(10 * 10**9))
            block = b'{"choices": [{"message": {"content": "' + b"la " * 20_000
        self.send_header("Connection", "close")
        self.end_headers()
        sent = 0
        try:
            while sent < 64 * 2**20:
                self.wfile.write(block)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.sent["stream" if streamed else "reply"] = sent


@pytest.mark.slow
def test_a_runaway_remote_engine_is_cut_off_at_a_bound_with_a_502(tmp_path: Path, corpus_store: Path) -> None:
    """A reply declaring 10 GB is refused from its headers; a stream is cut after max_tokens pieces and a margin
    (here 16 + 16), each read no further than a bound that fits max_tokens."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RunawayEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with running_server(_front(tmp_path, corpus_store, remote)) as url, \
                httpx.Client(base_url=url, timeout=60) as client:
            chat = {"model": "runaway", "messages": [{"role": "user", "content": "Sing."}], "max_tokens": 16}
            reply = client.post("/v1/chat/completions", json=chat)
            streamed = client.post("/v1/chat/completions", json={**chat, "stream": True})
            alive = client.get("/health/live")
    finally:
        server.shutdown()
    assert reply.status_code == 502 and "over" in reply.json()["error"]["message"], reply.text
    assert streamed.status_code == 200
    pieces = [line for line in streamed.text.splitlines() if '"content":"la' in line.replace(" ", "")]
    assert len(pieces) <= 32 and "more than 32 pieces" in streamed.text, streamed.text[-500:]
    assert alive.status_code == 200
    deadline = time.monotonic() + 10
    while len(_RunawayEngine.sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _RunawayEngine.sent["reply"] < 8 * 2**20 and _RunawayEngine.sent["stream"] < 8 * 2**20, _RunawayEngine.sent


class _MisshapenEngine(BaseHTTPRequestHandler):
    """An engine whose answers are valid HTTP and JSON but not what the OpenAI protocol says; `mode` picks which."""

    mode: ClassVar[str] = ""
    protocol_version = "HTTP/1.1"
    REPLIES: ClassVar[dict[str, object]] = {
        "choices a string": {"choices": "x"},
        "choices of numbers": {"choices": [5]},
        "message a list": {"choices": [{"message": []}]},
        "usage not numbers": {"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": "many"}},
        "a list": [1, 2],
    }

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.mode == "models data a number":
            return self._send(200, b'{"data": 5}')
        if self.mode == "models a byte a second":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(20):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(1)
            return None
        return self._send(200, json.dumps({"data": [{"id": "shapeless"}]}).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.mode in self.REPLIES:
            return self._send(200, json.dumps(self.REPLIES[self.mode]).encode())
        if self.mode == "a redirect with an answer":
            return self._send(307, b'{"choices": [{"message": {"content": "not the answer"}}]}',
                              Location="http://elsewhere.invalid/v1/chat/completions")
        if self.mode == "an error naming a path":
            return self._send(500, b'{"error": {"message": "cannot open /srv/models/finance-team/sql/weights.bin"}}')
        if self.mode == "Retry-After not a number":
            return self._send(429, b'{"error": {"message": "slow down"}}', Retry_After="\u00b2")
        return self._send(200, b"hello, no events here", "text/plain")  # "not events", asked to stream


@pytest.mark.slow
def test_a_remote_engine_answering_in_the_wrong_shape_is_a_502_never_a_500(tmp_path: Path, corpus_store: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MisshapenEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    chat = {"model": "shapeless", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 8}
    try:
        front = _front(tmp_path, corpus_store, f"http://127.0.0.1:{server.server_address[1]}",
                       remote_models_ttl_seconds=0)
        with running_server(front) as url, httpx.Client(base_url=url, timeout=60) as client:
            answers = {}
            for mode in [*_MisshapenEngine.REPLIES, "a redirect with an answer", "Retry-After not a number"]:
                _MisshapenEngine.mode = mode
                answers[mode] = client.post("/v1/chat/completions", json=chat)
            _MisshapenEngine.mode = "not events"
            streamed = client.post("/v1/chat/completions", json={**chat, "stream": True})
            _MisshapenEngine.mode = "models data a number"
            listed = client.get("/health/ready")
            _MisshapenEngine.mode = "models a byte a second"
            started = time.monotonic()
            slow = client.get("/health/ready")
            slow_seconds = time.monotonic() - started
    finally:
        server.shutdown()
    for mode, answer in answers.items():
        expected = 429 if mode == "Retry-After not a number" else 502
        assert answer.status_code == expected, (mode, answer.text)
        assert "not the answer" not in answer.text
    assert answers["Retry-After not a number"].headers["Retry-After"] == "1"
    assert "no events" in streamed.text and '"content":"hello' not in streamed.text.replace(" ", "")
    assert listed.status_code == 503 and slow.status_code == 503 and slow_seconds < 10


@pytest.mark.slow
def test_a_remote_engines_error_text_is_shown_to_user_keys_without_its_paths(
    tmp_path: Path, corpus_store: Path
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MisshapenEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _MisshapenEngine.mode = "an error naming a path"
    chat = {"model": "shapeless", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 8}
    try:
        front = _front(tmp_path, corpus_store, f"http://127.0.0.1:{server.server_address[1]}",
                       api_keys="user-key-remote", admin_api_keys="admin-key-remote")
        with running_server(front) as url, httpx.Client(base_url=url, timeout=60) as client:
            as_user = client.post("/v1/chat/completions", json=chat,
                                  headers={"Authorization": "Bearer user-key-remote"})
            as_admin = client.post("/v1/chat/completions", json=chat,
                                   headers={"Authorization": "Bearer admin-key-remote"})
    finally:
        server.shutdown()
    assert as_user.status_code == as_admin.status_code == 502
    assert "/srv/models/finance-team" not in as_user.text and "weights.bin" in as_user.json()["error"]["message"]
    assert "/srv/models/finance-team/sql/weights.bin" in as_admin.json()["error"]["message"]
