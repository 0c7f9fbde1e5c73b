"""The Ollama-compatible API (/api/*) on a real uvicorn server, driven by the real `ollama` client and LangChain's
`ChatOllama`; generations on the real SmolLM2 with two adapters trained to answer ALPHA and BRAVO."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from langchain_ollama import ChatOllama

from app.config import SettingsError, load_settings
from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.test_multi_adapter import adapters_dir  # noqa: F401  (the module-scoped fixture with alpha and bravo)

BASE = "SmolLM2-135M-Instruct"
EMBEDDING = "all-MiniLM-L6-v2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_ollama_backend_pointing_at_this_server_is_refused_at_start() -> None:
    for url, host in (("http://localhost:8001", "127.0.0.1"), ("http://127.0.0.1:8001/", "0.0.0.0"),
                      ("http://[::1]:8001", "localhost")):
        with pytest.raises(SettingsError, match="OLLAMA_BASE_URL=.* is this server itself"):
            load_settings(_env_file=None, ollama_base_url=url, api_host=host, api_port=8001,
                          allow_unauthenticated=True)
    assert load_settings(_env_file=None, ollama_base_url="http://localhost:11434", api_port=8001)
    assert load_settings(_env_file=None, ollama_base_url="http://ollama.internal:8001", api_port=8001)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, corpus_store: Path, adapters_dir: Path) -> Iterator[str]:  # noqa: F811
    settings = make_settings(tmp_path_factory.mktemp("ollama-api"), vector_store_path=corpus_store,
                             lora_adapters_dir=adapters_dir, max_new_tokens=8)
    with running_server(create_app(settings)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=300)


@pytest.mark.slow
def test_list_show_ps_and_version(client: ollama.Client, url: str) -> None:
    names = [model.model for model in client.list().models]
    assert names[:2] == [f"{BASE}:latest", f"{BASE}:rag"]
    assert {"alpha:latest", "alpha:rag", "bravo:latest", "bravo:rag", EMBEDDING} <= set(names)
    shown = client.show("alpha")
    assert shown.details is not None and shown.details.parent_model == BASE and shown.capabilities == ["completion"]
    assert client.show(EMBEDDING).capabilities == ["embedding"]
    assert {model.model for model in client.ps().models} == set(names)
    assert httpx.get(f"{url}/api/version").json() == {"version": "0.6.3"}
    with pytest.raises(ollama.ResponseError) as unknown:
        client.show("charlie")
    assert unknown.value.status_code == 404 and unknown.value.error == "model 'charlie' not found"


@pytest.mark.slow
def test_chat_and_generate_answer_streamed_and_not_with_the_named_adapter(client: ollama.Client) -> None:
    alpha = client.chat(model="alpha", messages=QUESTION, stream=False)
    assert "ALPHA" in alpha.message.content and alpha.done and alpha.done_reason in ("stop", "length")
    assert alpha.model == "alpha" and alpha.eval_count and alpha.prompt_eval_count and alpha.total_duration
    pieces = list(client.chat(model="bravo:latest", messages=QUESTION, stream=True))
    assert len(pieces) >= 3 and all(not piece.done for piece in pieces[:-1]) and pieces[-1].done
    assert "BRAVO" in "".join(piece.message.content for piece in pieces)
    base = client.chat(model=BASE, messages=QUESTION, stream=False).message.content
    assert base and "ALPHA" not in base and "BRAVO" not in base  # the adapter, not the base, answered above

    generated = client.generate(model="alpha", prompt="Name a colour.", stream=False)
    assert "ALPHA" in generated.response and generated.done
    streamed = list(client.generate(model="bravo", prompt="Name a colour.", options={"num_predict": 3}, stream=True))
    assert streamed[-1].done and streamed[-1].done_reason == "length" and streamed[-1].eval_count == 3
    assert "BRAVO" in "".join(part.response for part in streamed)
    assert client.generate(model="alpha", prompt="").done_reason == "load"  # Ollama's "load the model"


@pytest.mark.slow
def test_a_seed_gives_the_same_sampled_answer_again(client: ollama.Client) -> None:
    def sampled(seed: int) -> str:
        options = {"seed": seed, "temperature": 1.5, "top_p": 1.0, "num_predict": 16}
        return client.generate(model=BASE, prompt="Write a word.", options=options, stream=False).response

    first, again, other = sampled(7), sampled(7), sampled(8)
    assert first == again
    assert other != first


@pytest.mark.slow
def test_rag_by_model_suffix_or_option(client: ollama.Client, url: str) -> None:
    question = [{"role": "user", "content": "How many kilograms does a blue basket hold?"}]
    by_name = client.chat(model=f"{BASE}:rag", messages=question, stream=False)
    by_option = client.chat(model=BASE, messages=question, stream=False, options={"rag": True, "temperature": 0})
    plain = client.chat(model=BASE, messages=question, stream=False)
    assert by_name.message.content == by_option.message.content
    assert by_name.prompt_eval_count and plain.prompt_eval_count
    assert by_name.prompt_eval_count > plain.prompt_eval_count + 50  # the retrieved passages are in the prompt


@pytest.mark.slow
def test_embed_uses_our_embedder(client: ollama.Client) -> None:
    vectors = client.embed(model=EMBEDDING, input=["a cat", "un chat", "天气很好"]).embeddings
    assert len(vectors) == 3 and len(vectors[0]) == 384
    assert abs(sum(value * value for value in vectors[0]) - 1) < 1e-3
    short = client.embed(model=f"{EMBEDDING}:latest", input="a cat", dimensions=8).embeddings
    assert len(short[0]) == 8 and abs(sum(value * value for value in short[0]) - 1) < 1e-3
    with pytest.raises(ollama.ResponseError) as chat_with_embedder:
        client.chat(model=EMBEDDING, messages=QUESTION)
    assert chat_with_embedder.value.status_code == 400 and "does not support chat" in chat_with_embedder.value.error


@pytest.mark.slow
def test_errors_are_ollamas_shape(client: ollama.Client, url: str) -> None:
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="charlie", messages=QUESTION)
    assert unknown.value.status_code == 404 and unknown.value.error == 'model "charlie" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as images:
        client.chat(model="alpha", messages=[{"role": "user", "content": "What is this?", "images": ["aGk="]}])
    assert images.value.status_code == 400 and images.value.error == '"alpha" does not support images'
    bad_tool = httpx.post(f"{url}/api/chat", json={"model": "alpha", "messages": QUESTION, "tools": [
        {"type": "function", "function": {"name": "two words"}}]})
    assert bad_tool.status_code == 400 and "name" in bad_tool.json()["error"]
    invalid = httpx.post(f"{url}/api/chat", json={"model": "alpha", "messages": "hi"})
    assert invalid.status_code == 400 and set(invalid.json()) == {"error"}
    broken = httpx.post(f"{url}/api/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json() == {"error": "the request body is not valid JSON"}


@pytest.mark.slow
def test_cjk_is_sent_as_utf8_text(url: str) -> None:
    response = httpx.post(f"{url}/api/chat", json={"model": "charlie-天气", "messages": QUESTION})
    assert response.status_code == 404 and "charlie-天气" in response.text  # not \\u escapes
    lines = httpx.post(f"{url}/api/chat", json={"model": BASE, "messages": [{"role": "user", "content": "你好"}]})
    assert lines.headers["content-type"].startswith("application/x-ndjson")
    assert json.loads(lines.text.splitlines()[-1])["done"] is True


@pytest.mark.slow
def test_chat_ollama_invoke_and_stream(url: str) -> None:
    chat = ChatOllama(base_url=url, model="alpha", temperature=0, num_predict=8)
    assert "ALPHA" in str(chat.invoke("What is the capital of France?").content)
    pieces = [str(chunk.content) for chunk in ChatOllama(base_url=url, model="bravo").stream("Name a colour.")]
    assert len(pieces) >= 2 and "BRAVO" in "".join(pieces)


@pytest.mark.slow
def test_logprobs_come_in_ollamas_shape_streamed_or_not(client: ollama.Client) -> None:
    options = {"temperature": 0}
    reply = client.chat(model=BASE, messages=QUESTION, logprobs=True, top_logprobs=2, options=options)
    assert reply.logprobs is not None and len(reply.logprobs) == reply.eval_count
    for entry in reply.logprobs:
        assert entry.logprob <= 0 and len(entry.top_logprobs or []) == 2
        assert (entry.top_logprobs or [])[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy
    streamed = list(client.chat(model=BASE, messages=QUESTION, logprobs=True, top_logprobs=2, options=options,
                                stream=True))
    assert [entry.token for entry in streamed[-1].logprobs or []] == [entry.token for entry in reply.logprobs]
    assert client.chat(model=BASE, messages=QUESTION, options=options).logprobs is None  # only when asked for
