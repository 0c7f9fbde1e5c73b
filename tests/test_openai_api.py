"""The OpenAI-compatible API on a real uvicorn server with the real SmolLM2 model and a random LoRA adapter,
driven by the official `openai` client and LangChain's `ChatOpenAI`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from openai import OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import SecretStr

from app.main import create_app
from tests.conftest import make_settings, running_server

pytestmark = pytest.mark.slow

BASE = "SmolLM2-135M-Instruct"  # the served name derived from the embedded base model
ADAPTER = "default"  # the adapter found directly in LORA_MODEL_PATH
MAX_NEW_TOKENS = 16  # the server's cap on max_tokens
QUESTION = [{"role": "user", "content": "Name three fruits."}]
BASKET = "How many kilograms does a blue basket hold?"


def _save_random_lora(folder: Path) -> Path:
    """A LoRA adapter for SmolLM2 with random (non-zero) B matrices, so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.llm.model_source import resolve_base_model

    base = AutoModelForCausalLM.from_pretrained(resolve_base_model("embedded:SmolLM2-135M-Instruct", None))
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, corpus_store: Path) -> Iterator[str]:
    adapter = _save_random_lora(tmp_path_factory.mktemp("adapter") / "random")
    settings = make_settings(
        tmp_path_factory.mktemp("openai"),
        vector_store_path=corpus_store,
        lora_model_path=adapter,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    with running_server(create_app(settings)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120, max_retries=0)


def _create(client: OpenAI, **request: Any) -> ChatCompletion:
    """A non-streamed completion (untyped keyword arguments: our extras and refused values included)."""
    completion: ChatCompletion = client.chat.completions.create(**request)
    return completion


def _stream(client: OpenAI, **request: Any) -> list[ChatCompletionChunk]:
    return list(client.chat.completions.create(**request, stream=True))


def _combination_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        json.loads(record.getMessage())
        for record in caplog.records
        if record.name == "app.rag.service" and "model_lora_combination" in record.getMessage()
    ]


def test_models_lists_the_base_model_then_the_adapter_with_its_parent(client: OpenAI, url: str) -> None:
    models = client.models.list().data
    assert [model.id for model in models] == [BASE, ADAPTER]
    base, adapter = models
    assert base.object == "model" and base.owned_by == "lora-rag"
    assert base.model_extra == {"root": BASE, "parent": None}
    assert adapter.model_extra == {"root": BASE, "parent": BASE}
    unversioned = httpx.get(f"{url}/models", timeout=30).json()
    assert unversioned["object"] == "list"
    assert [(m["id"], m["parent"]) for m in unversioned["data"]] == [(BASE, None), (ADAPTER, BASE)]


def test_chat_completion_on_the_base_model(client: OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.rag.service")
    completion = _create(client, model=BASE, messages=QUESTION, max_tokens=4, temperature=0)
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == BASE and completion.created > 0
    (choice,) = completion.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # four tokens do not finish an answer
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 4
    assert usage.prompt_tokens > 5 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert "sources" not in (completion.model_extra or {})
    (event,) = _combination_events(caplog)
    assert event["adapters_requested"] == "base" and event["model_used"] == "base" and event["status"] == "ok"


def test_model_naming_the_adapter_answers_with_it(client: OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.rag.service")
    completion = _create(client, model=ADAPTER, messages=QUESTION, max_tokens=6, temperature=0)
    assert completion.model == ADAPTER and completion.choices[0].message.content
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 6
    (event,) = _combination_events(caplog)
    assert event["model_used"] == "lora" and event["adapters"] == ADAPTER


def test_adapter_fields_override_model(client: OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.rag.service")
    _create(
        client, model=BASE, messages=QUESTION, max_tokens=2, temperature=0, extra_body={"lora_adapter_ids": [ADAPTER]}
    )
    _create(client, model=ADAPTER, messages=QUESTION, max_tokens=2, temperature=0, extra_body={"adapter": None})
    first, second = _combination_events(caplog)
    assert first["adapters"] == ADAPTER and second["model_used"] == "base"


def test_streaming_sends_role_pieces_finish_usage_and_done(client: OpenAI) -> None:
    request: dict[str, Any] = {"model": BASE, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    whole = _create(client, **request)
    chunks = _stream(client, **request, stream_options={"include_usage": True})
    assert {chunk.id for chunk in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == BASE for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, final, usage_chunk = chunks
    text = "".join(chunk.choices[0].delta.content or "" for chunk in content_chunks)
    assert len(content_chunks) > 2 and text.strip() == whole.choices[0].message.content
    assert all(chunk.choices[0].finish_reason is None for chunk in content_chunks)
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason and final.choices[0].delta.content is None
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_streaming_wire_format(url: str) -> None:
    body = {"model": BASE, "messages": QUESTION, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: ") for event in events[:-1])
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    last = json.loads(events[-3].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last  # no include_usage asked


def test_rag_answers_from_the_documents_and_returns_sources(client: OpenAI) -> None:
    messages = [{"role": "user", "content": BASKET}]
    completion = _create(
        client, model=BASE, messages=messages, max_tokens=MAX_NEW_TOKENS, temperature=0, extra_body={"rag": True}
    )
    sources = (completion.model_extra or {})["sources"]
    assert sources[0]["metadata"]["source"] == "corpus/orchards.md"
    assert "eighteen kilograms" in sources[0]["content"] and sources[0]["score"] > 0
    assert sources[0]["score_kind"] == "calibrated"  # hybrid retrieval, the default
    plain = _create(client, model=BASE, messages=messages, max_tokens=2, temperature=0)
    assert completion.usage is not None and plain.usage is not None
    assert completion.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the passages are in the prompt

    chunks = _stream(client, model=BASE, messages=messages, max_tokens=4, temperature=0, extra_body={"rag": True})
    final = chunks[-1]
    assert final.choices[0].finish_reason is not None
    assert (final.model_extra or {})["sources"][0]["metadata"]["source"] == "corpus/orchards.md"
    assert all("sources" not in (chunk.model_extra or {}) for chunk in chunks[:-1])


def test_text_content_parts_are_read(client: OpenAI) -> None:
    parts = [{"type": "text", "text": "Name three"}, {"type": "text", "text": "fruits."}]
    completion = _create(
        client,
        model=BASE,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}],
        max_tokens=2,
        temperature=0,
        user="someone",
        seed=1,
        presence_penalty=0,
        frequency_penalty=0,
        logprobs=False,
        n=1,
    )
    assert completion.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max_tokens": 1000}, f"at most {MAX_NEW_TOKENS}"),
        ({"max_completion_tokens": MAX_NEW_TOKENS + 1}, "max_completion_tokens"),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
        ({"messages": [{"role": "function", "content": "42", "name": "f"}]}, "'function'"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "tool_call_id"),
        ({"rag": True, "messages": [{"role": "system", "content": "Be brief."}]}, "rag: true needs a user message"),
    ],
)
def test_what_cannot_be_honoured_is_refused_with_400(client: OpenAI, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        _create(client, model=BASE, messages=QUESTION, max_tokens=2, extra_body=extra)
    assert error.value.status_code == 400 and message in error.value.response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [f"s{number}" for number in range(17)]}, "stop"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"messages": []}, "messages"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"response_format": {"type": "grammar"}}, "response_format"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"n": 9}, "n"),
    ],
)
def test_invalid_fields_are_openais_400_naming_the_field(url: str, extra: dict[str, Any], field: str) -> None:
    body = {"model": BASE, "messages": QUESTION, **extra}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    error = response.json()["error"]  # OpenAI never answers 422: a field it cannot use is invalid_request_error
    assert response.status_code == 400 and error["type"] == "invalid_request_error"
    assert field in error["message"]


@pytest.mark.parametrize(
    ("messages", "limit"),
    [
        ([{"role": "user", "content": "x" * 4001}], "MAX_QUERY_CHARS=4000"),
        ([{"role": "system", "content": "x" * 4001}, *QUESTION], "MAX_QUERY_CHARS=4000"),
        ([{"role": "user" if n % 2 == 0 else "assistant", "content": "Hi"} for n in range(65)], "MAX_MESSAGES=64"),
        (None, None),  # each limit exactly reached: accepted
    ],
)
def test_message_length_and_count_limits(url: str, messages: list[dict[str, str]] | None, limit: str | None) -> None:
    if messages is None:
        messages = [*QUESTION * 62, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "x" * 4000}]
    body = {"model": BASE, "messages": messages, "max_tokens": 1}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    if limit is None:
        assert response.status_code == 200, response.text
    else:
        error = response.json()["error"]
        assert response.status_code == 400 and error["type"] == "invalid_request_error"
        assert limit in error["message"]


def test_unknown_model_is_404_listing_the_served_names(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        _create(client, model="gpt-4o", messages=QUESTION)
    body = error.value.response.json()["error"]
    assert body["code"] == "model_not_found"
    assert "gpt-4o" in body["message"] and BASE in body["message"] and ADAPTER in body["message"]
    # A base model served nowhere here, with an adapter of ours named beside it: still 404, never our base model
    # answering a request meant for another one.
    with pytest.raises(openai.NotFoundError) as error:
        _create(client, model="Qwen2.5-72B", messages=QUESTION, max_tokens=2, extra_body={"adapter": ADAPTER})
    assert error.value.response.json()["error"]["code"] == "model_not_found"


def test_unknown_adapter_field_is_404_adapter_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        _create(client, model=BASE, messages=QUESTION, max_tokens=2, stream=True, extra_body={"adapter_id": "nope"})
    assert error.value.response.json()["error"]["code"] == "adapter_not_found"


def test_stop_string_ends_the_answer(client: OpenAI) -> None:
    whole = _create(client, model=BASE, messages=QUESTION, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content or ""
    words = text.split()
    assert len(words) >= 3, text
    stopped = _create(client, model=BASE, messages=QUESTION, max_tokens=12, temperature=0, stop=[words[2]])
    assert stopped.choices[0].finish_reason == "stop"
    assert words[2] not in (stopped.choices[0].message.content or "")
    assert text.startswith(stopped.choices[0].message.content or "")


def test_langchain_chat_openai_invoke_and_stream(url: str) -> None:
    llm = ChatOpenAI(
        base_url=f"{url}/v1", api_key=SecretStr("x"), model=BASE, temperature=0, max_completion_tokens=6, max_retries=0
    )
    reply = llm.invoke("Name three fruits.")
    assert isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["model_name"] == BASE and reply.response_metadata["finish_reason"] == "length"
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] == 6

    chunks = list(llm.stream("Name three fruits.", stream_usage=True))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert isinstance(merged.content, str) and merged.content.strip() == reply.content
    assert merged.usage_metadata is not None and merged.usage_metadata["output_tokens"] == 6

    adapter_llm = ChatOpenAI(base_url=f"{url}/v1", api_key=SecretStr("x"), model=ADAPTER, max_completion_tokens=4)
    adapter_reply = adapter_llm.invoke("Hello")
    assert adapter_reply.response_metadata["model_name"] == ADAPTER and adapter_reply.content


def test_logprobs_have_openais_shape_streamed_or_not(client: OpenAI) -> None:
    request: dict[str, Any] = {"model": BASE, "messages": QUESTION, "max_tokens": 6, "temperature": 0,
                               "logprobs": True, "top_logprobs": 3}
    completion = _create(client, **request)
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == completion.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        alternatives = [top.logprob for top in entry.top_logprobs]
        assert entry.logprob <= 0 and len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert alternatives[0] == pytest.approx(entry.logprob, abs=1e-5)  # greedy: the chosen token is the likeliest
    text = b"".join(bytes(entry.bytes) for entry in content).decode("utf-8", errors="replace")
    assert text.strip() == completion.choices[0].message.content  # the bytes spell the answer
    streamed = _stream(client, **request)
    last = [chunk.choices[0].logprobs for chunk in streamed if chunk.choices and chunk.choices[0].logprobs]
    assert [entry.token for entry in last[-1].content or []] == [entry.token for entry in content]


def test_n_choices_come_with_their_indexes_streamed_or_not(client: OpenAI) -> None:
    request: dict[str, Any] = {"model": BASE, "messages": QUESTION, "max_tokens": 8, "temperature": 1.0, "n": 3,
                               "seed": 11, "logprobs": True}
    completion = _create(client, **request)
    texts = [choice.message.content for choice in completion.choices]
    assert [choice.index for choice in completion.choices] == [0, 1, 2] and all(texts)
    assert len(set(texts)) > 1  # sampled from seeds 11, 12 and 13
    tokens = [len(choice.logprobs.content or []) for choice in completion.choices if choice.logprobs]
    assert completion.usage.completion_tokens == sum(tokens)  # type: ignore[union-attr]  # the prompt counted once
    by_index: dict[int, str] = {}
    for chunk in _stream(client, **request):
        for choice in chunk.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(by_index) == [0, 1, 2] and all(by_index.values())
