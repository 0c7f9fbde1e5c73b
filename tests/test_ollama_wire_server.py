"""The wire server must look like a real Ollama to the real clients (ollama-python, langchain-ollama)."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import ollama
import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_ollama import ChatOllama

try:
    from tests.ollama_wire_server import OllamaWireServer, default_reply, split_tokens
except ImportError:  # pytest run without the repo root on sys.path puts tests/ itself there
    from ollama_wire_server import OllamaWireServer, default_reply, split_tokens  # type: ignore[no-redef]

MODEL = "qwen3:4b"
EMBED_MODEL = "nomic-embed-text:latest"
QUESTION = "What is LoRA and why does it need so little memory?"
STAT_KEYS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@pytest.fixture
def server() -> Iterator[OllamaWireServer]:
    with OllamaWireServer(models=[MODEL, EMBED_MODEL], embedding_dim=8) as srv:
        yield srv


@pytest.fixture
def client(server: OllamaWireServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.base_url, timeout=5) as cl:
        yield cl


def _user(text: str = QUESTION) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# -- ollama-python client ----------------------------------------------------------------------


def test_chat_non_streaming(server: OllamaWireServer, client: ollama.Client) -> None:
    resp = client.chat(model=MODEL, messages=_user(), stream=False, options={"temperature": 0.1, "num_predict": 99})

    expected = default_reply(MODEL, _user())
    assert resp.message.role == "assistant"
    assert resp.message.content == expected
    assert MODEL in expected and QUESTION[:20] in expected
    assert resp.done is True and resp.done_reason == "stop"
    assert resp.model == MODEL and resp.created_at
    for key in STAT_KEYS:
        assert isinstance(resp[key], int) and resp[key] > 0, key
    assert resp.eval_count == len(split_tokens(expected))

    (body,) = server.bodies("/api/chat")
    assert body["stream"] is False
    assert body["options"]["temperature"] == 0.1 and body["options"]["num_predict"] == 99
    assert body["messages"] == _user()


def test_chat_streaming(client: ollama.Client) -> None:
    chunks = list(client.chat(model=MODEL, messages=_user(), stream=True))

    expected = default_reply(MODEL, _user())
    assert len(chunks) == len(split_tokens(expected)) + 1
    assert all(c.done is False for c in chunks[:-1])
    final = chunks[-1]
    assert final.done is True and final.done_reason == "stop" and final.message.content == ""
    assert "".join(c.message.content or "" for c in chunks) == expected
    assert final.eval_count == len(chunks) - 1
    for key in STAT_KEYS:
        assert isinstance(final[key], int), key


def test_num_predict_truncates_with_length_reason(client: ollama.Client) -> None:
    chunks = list(client.chat(model=MODEL, messages=_user(), stream=True, options={"num_predict": 3}))
    assert len(chunks) == 4
    assert chunks[-1].done_reason == "length" and chunks[-1].eval_count == 3

    resp = client.chat(model=MODEL, messages=_user(), options={"num_predict": 2})
    assert resp.done_reason == "length"
    assert resp.message.content == "".join(split_tokens(default_reply(MODEL, _user()))[:2])


def test_generate_both_modes(server: OllamaWireServer, client: ollama.Client) -> None:
    resp = client.generate(model=MODEL, prompt=QUESTION, system="be brief")
    assert resp.response == default_reply(MODEL, _user())
    assert resp.done and resp.done_reason == "stop"

    parts = list(client.generate(model=MODEL, prompt=QUESTION, stream=True))
    assert "".join(p.response for p in parts) == resp.response
    assert parts[-1].done and parts[-1].response == ""
    assert server.bodies("/api/generate")[0]["system"] == "be brief"


def test_custom_reply_sees_all_messages() -> None:
    seen: list[tuple[str, list[dict[str, Any]]]] = []

    def reply(model: str, messages: list[dict[str, Any]]) -> str:
        seen.append((model, messages))
        return "forty two"

    msgs = [{"role": "system", "content": "ctx"}, {"role": "user", "content": "q?"}]
    with OllamaWireServer(models=[MODEL], reply=reply) as srv, ollama.Client(host=srv.base_url) as client:
        resp = client.chat(model=MODEL, messages=msgs)
    assert resp.message.content == "forty two"
    assert seen == [(MODEL, msgs)]


def test_bare_model_name_resolves_to_latest(client: ollama.Client) -> None:
    assert client.embed(model="nomic-embed-text", input="x").embeddings


def test_list_show_version(server: OllamaWireServer, client: ollama.Client) -> None:
    listed = client.list()
    assert [m.model for m in listed.models] == [MODEL, EMBED_MODEL]
    assert all(m.size and m.digest and m.details and m.modified_at for m in listed.models)

    raw = httpx.get(f"{server.base_url}/api/tags").json()
    assert {"name", "model", "modified_at", "size", "digest", "details"} <= raw["models"][0].keys()

    shown = client.show(MODEL)
    assert shown.details is not None and shown.details.format == "gguf"
    assert shown.modelinfo

    assert httpx.get(f"{server.base_url}/api/version").json() == {"version": "0.6.3"}
    assert httpx.get(f"{server.base_url}/").text == "Ollama is running"


def test_embed_is_deterministic_normalised_and_similarity_preserving() -> None:
    with OllamaWireServer(models=[EMBED_MODEL], embedding_dim=64) as srv, ollama.Client(host=srv.base_url) as client:
        texts = [
            "LoRA adapters fine-tune large language models cheaply",
            "LoRA adapters fine tune large language models cheaply!",
            "The recipe needs two eggs and a cup of flour",
        ]
        resp = client.embed(model=EMBED_MODEL, input=texts)
        again = client.embed(model=EMBED_MODEL, input=texts[0])
        legacy = client.embeddings(model=EMBED_MODEL, prompt=texts[0])

    assert resp.model == EMBED_MODEL
    assert len(resp.embeddings) == 3 and all(len(e) == 64 for e in resp.embeddings)
    assert all(abs(math.sqrt(sum(v * v for v in e)) - 1.0) < 1e-9 for e in resp.embeddings)
    assert isinstance(resp.total_duration, int) and isinstance(resp.prompt_eval_count, int)
    assert list(again.embeddings[0]) == list(resp.embeddings[0]) == list(legacy.embedding)
    e0, e1, e2 = resp.embeddings
    assert _cosine(e0, e1) > 0.8 > _cosine(e0, e2) + 0.3


def test_missing_model_is_404_response_error(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="llama9:1t", messages=_user())
    assert info.value.status_code == 404
    assert info.value.error == 'model "llama9:1t" not found, try pulling it first'

    with pytest.raises(ollama.ResponseError) as info:
        list(client.chat(model="llama9:1t", messages=_user(), stream=True))
    assert info.value.status_code == 404

    for call in (
        lambda: client.generate(model="nope", prompt="x"),
        lambda: client.embed(model="nope", input=["x"]),
        lambda: client.show("nope"),
    ):
        with pytest.raises(ollama.ResponseError) as info:
            call()
        assert info.value.status_code == 404


def test_fail_with_and_garbage(server: OllamaWireServer, client: ollama.Client) -> None:
    server.fail_with = (500, "llama runner process has terminated")
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=MODEL, messages=_user())
    assert info.value.status_code == 500 and "runner process" in info.value.error
    with pytest.raises(ollama.ResponseError):
        list(client.generate(model=MODEL, prompt="x", stream=True))
    assert client.list().models  # only generation endpoints fail

    server.fail_with = None
    server.garbage = True
    with pytest.raises(json.JSONDecodeError):
        client.chat(model=MODEL, messages=_user())
    with pytest.raises(json.JSONDecodeError):
        list(client.chat(model=MODEL, messages=_user(), stream=True))

    server.garbage = False
    assert client.chat(model=MODEL, messages=_user()).done


def test_error_in_the_middle_of_a_stream(server: OllamaWireServer, client: ollama.Client) -> None:
    server.fail_mid_stream = (2, "an error was encountered while running the model")
    received: list[str] = []
    with pytest.raises(ollama.ResponseError) as info:
        for chunk in client.chat(model=MODEL, messages=_user(), stream=True):
            received.append(chunk.message.content or "")
    assert len(received) == 2
    assert "running the model" in info.value.error


def test_unknown_path_and_bad_json(server: OllamaWireServer) -> None:
    resp = httpx.get(f"{server.base_url}/api/nope")
    assert resp.status_code == 404 and resp.text == "404 page not found"
    assert httpx.get(f"{server.base_url}/api/chat").status_code == 404  # wrong method, like Gin

    resp = httpx.post(f"{server.base_url}/api/chat", content=b"{not json")
    assert resp.status_code == 400 and "error" in resp.json()
    resp = httpx.post(f"{server.base_url}/api/chat", json={"messages": _user()})
    assert resp.status_code == 400 and resp.json() == {"error": "model is required"}

    assert [r.path for r in server.requests] == ["/api/nope", "/api/chat", "/api/chat", "/api/chat"]
    assert server.requests[2].body is None and server.requests[2].raw_body == b"{not json"


def test_stream_defaults_to_true_on_the_wire(server: OllamaWireServer) -> None:
    with httpx.stream("POST", f"{server.base_url}/api/chat", json={"model": MODEL, "messages": _user()}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/x-ndjson"
        assert resp.headers["transfer-encoding"] == "chunked"
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    assert all(set(line) >= {"model", "created_at", "message", "done"} for line in lines)


def test_token_delay_makes_a_slow_server(server: OllamaWireServer) -> None:
    server.token_delay = 0.3
    with ollama.Client(host=server.base_url, timeout=httpx.Timeout(2.0, read=0.1)) as slow:
        with pytest.raises(httpx.ReadTimeout):
            slow.chat(model=MODEL, messages=_user())
    server.token_delay = 0.0
    with ollama.Client(host=server.base_url) as client:
        assert client.chat(model=MODEL, messages=_user()).done


def test_client_hanging_up_mid_stream_does_not_hurt_the_server() -> None:
    long_reply = " ".join(f"w{i}" for i in range(500))
    with OllamaWireServer(models=[MODEL], reply=lambda _m, _msgs: long_reply, token_delay=0.002) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            body = json.dumps({"model": MODEL, "messages": _user()}).encode()
            sock.sendall(
                b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 3
        while srv.aborted_streams == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.aborted_streams == 1
        srv.reply = lambda _m, _msgs: "still alive"
        with ollama.Client(host=srv.base_url) as client:
            assert client.chat(model=MODEL, messages=_user()).message.content == "still alive"


def test_stop_is_prompt_and_releases_the_port() -> None:
    srv = OllamaWireServer(models=[MODEL], token_delay=5.0).start()
    url = srv.base_url
    client = httpx.Client(timeout=10)
    assert client.get(f"{url}/api/version").status_code == 200  # leaves an idle keep-alive connection
    started = time.monotonic()
    srv.stop()
    srv.stop()
    assert time.monotonic() - started < 2
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/api/version", timeout=1)
    client.close()


# -- langchain-ollama --------------------------------------------------------------------------


@contextmanager
def _chat_ollama(**kwargs: Any) -> Iterator[ChatOllama]:
    llm = ChatOllama(**kwargs)
    try:
        yield llm
    finally:
        # ChatOllama has no public close(); its pooled httpx sockets would otherwise leak ResourceWarnings.
        llm._client.close()


def test_langchain_chat_ollama_invoke_and_stream(server: OllamaWireServer) -> None:
    messages = [SystemMessage("Answer from the context."), HumanMessage(QUESTION)]
    with _chat_ollama(model=MODEL, base_url=server.base_url, temperature=0.2, num_predict=64) as llm:
        result = llm.invoke(messages)
        streamed = list(llm.stream(messages))

    expected = default_reply(MODEL, [{"role": "user", "content": QUESTION}])
    assert result.content == expected
    assert result.response_metadata["done_reason"] == "stop"
    assert result.usage_metadata is not None and result.usage_metadata["output_tokens"] == len(split_tokens(expected))

    assert "".join(str(c.content) for c in streamed) == expected
    assert len(streamed) > 2

    bodies = server.bodies("/api/chat")
    assert len(bodies) == 2
    for body in bodies:
        assert body["model"] == MODEL
        assert body["options"]["temperature"] == 0.2 and body["options"]["num_predict"] == 64
        assert [m["role"] for m in body["messages"]] == ["system", "user"]


def test_langchain_missing_model_surfaces_404(server: OllamaWireServer) -> None:
    with _chat_ollama(model="absent:1b", base_url=server.base_url) as llm, pytest.raises(ollama.ResponseError) as info:
        llm.invoke("hi")
    assert info.value.status_code == 404
