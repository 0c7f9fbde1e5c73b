"""POST /v1/embeddings driven by the official `openai` client, on an app that starts on the Ollama backend (the
local generation model never loads; the vectors come from the real embedder)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from app.config import EMBEDDED_EMBEDDING_MODEL
from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

SHORT_NAME = EMBEDDED_EMBEDDING_MODEL.removeprefix("embedded:")
# Related pairs and an unrelated sentence, in English and in Chinese.
SENTENCES = [
    "A cat is sleeping on the sofa.", "A kitten naps on the couch.", "Interest rates rose again this quarter.",
    "今天天气很好，阳光明媚。", "今天的天气非常好。", "股票市场大幅下跌。",
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, corpus_store: Path) -> Iterator[openai.OpenAI]:
    with OllamaWireServer(models=["qwen3:4b"]) as ollama:
        settings = make_settings(tmp_path_factory.mktemp("openai-embeddings"), vector_store_path=corpus_store,
                                 use_lora_default=False, ollama_base_url=ollama.base_url, max_query_chars=200)
        with running_server(create_app(settings)) as url:
            yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_unit_vectors_that_place_related_sentences_closer(client: openai.OpenAI) -> None:
    answer = client.embeddings.create(model=SHORT_NAME, input=SENTENCES)
    vectors = np.array([item.embedding for item in answer.data])
    assert [item.index for item in answer.data] == list(range(len(SENTENCES))) and vectors.shape == (6, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    cosine = vectors @ vectors.T
    assert cosine[0, 1] > cosine[0, 2] and cosine[3, 4] > cosine[3, 5]
    assert answer.model == SHORT_NAME and answer.usage.prompt_tokens == answer.usage.total_tokens > 0


def test_full_name_dimensions_and_base64_give_the_same_floats(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=EMBEDDED_EMBEDDING_MODEL, input="a cat", dimensions=8,
                                      encoding_format="float").data[0].embedding
    raw = client.embeddings.with_raw_response.create(model=SHORT_NAME, input="a cat", dimensions=8,
                                                     encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert len(floats) == 8 and abs(np.linalg.norm(floats) - 1) < 1e-3
    assert np.allclose(decoded, floats, atol=1e-6)
    # The client decodes base64 itself when it asked for floats; asked explicitly, it hands the string back.
    assert np.allclose(client.embeddings.create(model=SHORT_NAME, input="a cat", dimensions=8).data[0].embedding,
                       floats, atol=1e-6)


def test_unknown_model_token_ids_and_limits_are_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.embeddings.create(model="text-embedding-3-small", input="a cat")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as tokens:
        client.embeddings.create(model=SHORT_NAME, input=[[1, 2, 3]])
    assert tokens.value.code == "unsupported_parameter" and "token ids" in tokens.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        client.embeddings.create(model=SHORT_NAME, input=["a cat", "x" * 201])
    assert "input[1]" in too_long.value.message and "MAX_QUERY_CHARS=200" in too_long.value.message
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=SHORT_NAME, input=[])
    surrogate = httpx.post(f"{client.base_url}embeddings", content=b'{"model": "x", "input": "\\ud800"}',
                           headers={"Content-Type": "application/json"})
    assert surrogate.status_code == 400 and surrogate.json()["error"]["type"] == "invalid_request_error"


def test_more_dimensions_than_the_embedder_has_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=SHORT_NAME, input="a cat", dimensions=385)
    assert "dimensions is 385" in refused.value.message and "384" in refused.value.message
    ollama_embed = httpx.post(f"{str(client.base_url).removesuffix('/v1/')}/api/embed", timeout=60,
                              json={"model": SHORT_NAME, "input": "a cat", "dimensions": 4096})
    assert ollama_embed.status_code == 400 and "dimensions is 4096" in ollama_embed.json()["error"]


def test_embedding_requests_beyond_their_bound_are_a_fast_503_and_chats_go_on(
    tmp_path: Path, corpus_store: Path
) -> None:
    """One embeds, one waits (MAX_CONCURRENT_EMBEDDINGS=1, MAX_QUEUED_REQUESTS=1), the third is refused at once
    with Retry-After; a chat meanwhile is admitted apart from them."""
    with OllamaWireServer(models=["qwen3:4b"]) as ollama:
        settings = make_settings(tmp_path, vector_store_path=corpus_store, use_lora_default=False,
                                 ollama_base_url=ollama.base_url, max_concurrent_embeddings=1,
                                 max_queued_requests=1)
        with running_server(create_app(settings)) as url:
            texts = [f"Document {n}: " + "the harvest was stored in blue baskets. " * 40 for n in range(96)]

            async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
                async with httpx.AsyncClient(base_url=url, timeout=300) as http:
                    embeddings = [asyncio.create_task(http.post("/v1/embeddings", json={
                        "model": SHORT_NAME, "input": texts})) for _ in range(3)]
                    await asyncio.sleep(0.3)
                    chat = await http.post("/v1/chat/completions", json={
                        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 4})
                    return list(await asyncio.gather(*embeddings)), chat

            embedded, chat = asyncio.run(scenario())
    assert sorted(response.status_code for response in embedded) == [200, 200, 503]
    busy = next(response for response in embedded if response.status_code == 503)
    assert busy.headers["Retry-After"] and busy.json()["error"]["code"] == "busy"
    assert chat.status_code == 200, chat.text
