"""Structured output: replies held to JSON (any object, or valid for a JSON Schema) by the engine's token mask.

On the engine (the real SmolLM2 backend, float32, random LoRA adapters): constrained and free rows on different
adapters share a batch and each answers exactly as alone; a budget ending inside the JSON gives `length` and the
JSON so far; JSON completed on the budget's last token is `stop`; a schema that cannot compile is refused before
anything is generated. On a live server, through the official clients: `openai` (`response_format` json_schema
with `.parse()` and a pydantic model, json_object, streamed), LangChain's `ChatOpenAI` and `ChatOllama`
`with_structured_output`, the `ollama` client's `format`, and /ask's `response_format`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from app.errors import InvalidOutputConstraintError
from app.llm.backends.hf import HFLoraBackend
from app.llm.base import AdapterSpec, ChatMessage, GenerationParams, GenerationResult, OutputConstraint
from app.llm.model_source import resolve_base_model
from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.test_adapters import _save_lora

pytestmark = pytest.mark.slow

BASE = "SmolLM2-135M-Instruct"
TIMEOUT_S = 120.0
PERSON_QUESTION: list[ChatMessage] = [{"role": "user", "content": "Describe a person as JSON: their name and age."}]
FRUITS: list[ChatMessage] = [{"role": "user", "content": "Name three fruits."}]


class Person(BaseModel):
    """Bounded fields and no others (`additionalProperties: false`, as OpenAI's strict mode has it), so even a random
    adapter's row ends within a small budget."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=150)


class Named(BaseModel):
    """What JSON mode can promise: any JSON object, so only keys the question asks for are relied on."""

    name: str
    age: int


PERSON = OutputConstraint.json_schema(Person.model_json_schema())
#: JSON mode holds the reply to a JSON object, not to the schema: which keys come is the model's own choice.
JSON_MODE = pytest.param("json_mode", marks=pytest.mark.numerics)
ANY_OBJECT = OutputConstraint("json_object")


def _params(tokens: int, constraint: OutputConstraint | None = None, **sampling: Any) -> GenerationParams:
    return GenerationParams(max_new_tokens=tokens, temperature=sampling.pop("temperature", 0.0), top_p=1.0,
                            constraint=constraint, **sampling)


# -- the engine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HFLoraBackend]:
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("structured")
    source = resolve_base_model("embedded:SmolLM2-135M-Instruct", None)
    loaded = HFLoraBackend.load(make_settings(folder, numeric_path="float32", max_batch_size=8))
    for name, seed in (("one", 11), ("two", 12)):
        adapter = _save_lora(AutoModelForCausalLM.from_pretrained(source), folder / name, seed, scale=0.2)
        asyncio.run(loaded.load_adapter(name, adapter))
    yield loaded
    asyncio.run(loaded.close())


Answer = tuple[str, str, int]


def _answer(result: GenerationResult) -> Answer:
    return result.text, result.finish_reason, result.completion_tokens


def _alone(backend: HFLoraBackend, messages: list[ChatMessage], params: GenerationParams, spec: AdapterSpec) -> Answer:
    return _answer(asyncio.run(backend.generate(messages, params, spec)))


def test_constrained_and_free_rows_on_different_adapters_share_a_batch_and_each_answers_as_alone(
    backend: HFLoraBackend,
) -> None:
    requests: dict[str, tuple[list[ChatMessage], GenerationParams, AdapterSpec]] = {
        "schema on one": (PERSON_QUESTION, _params(48, PERSON), (("one", 1.0),)),
        "free on two": (FRUITS, _params(24), (("two", 1.0),)),
        "object on the base": (PERSON_QUESTION, _params(48, ANY_OBJECT), ()),
        "schema sampled on a mix": (PERSON_QUESTION, _params(48, PERSON, temperature=0.8, seed=7),
                                    (("one", 0.5), ("two", 0.5))),
    }
    alone = {name: _alone(backend, *request) for name, request in requests.items()}
    assert len({text for text, _, _ in alone.values()}) == len(alone), alone

    async def together() -> list[GenerationResult]:
        work = [backend.generate(*request) for request in requests.values()]
        return await asyncio.wait_for(asyncio.gather(*work), TIMEOUT_S)

    for name, result in zip(requests, asyncio.run(together()), strict=True):
        assert _answer(result) == alone[name], name
    for name in ("schema on one", "schema sampled on a mix"):
        assert alone[name][1] == "stop", alone[name]
        Person.model_validate_json(alone[name][0])  # valid for the schema, whatever the adapter would rather say
    assert isinstance(json.loads(alone["object on the base"][0]), dict)
    assert not alone["free on two"][0].startswith("{")  # the free row was not held to JSON


def test_a_budget_ending_inside_the_json_gives_length_and_the_json_so_far(backend: HFLoraBackend) -> None:
    whole = _alone(backend, PERSON_QUESTION, _params(48, PERSON), ())
    cut = _alone(backend, PERSON_QUESTION, _params(4, PERSON), ())
    assert whole[1] == "stop" and whole[2] > 4, whole
    assert cut[1] == "length" and cut[2] == 4
    assert whole[0].startswith(cut[0]) and cut[0].startswith("{")


def test_json_completed_on_the_budgets_last_token_ends_with_stop_not_length(backend: HFLoraBackend) -> None:
    const = OutputConstraint.json_schema({"type": "object", "properties": {"unit": {"const": "kg"}},
                                          "required": ["unit"], "additionalProperties": False})
    whole = _alone(backend, PERSON_QUESTION, _params(48, const), ())
    assert whole[0] == '{"unit": "kg"}' and whole[1] == "stop"
    assert _alone(backend, PERSON_QUESTION, _params(whole[2], const), ()) == whole


@pytest.mark.parametrize(("schema", "problem"), [
    ({"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}, "missing"),
    ({"type": "frobnicate"}, "frobnicate"),
])
def test_a_schema_that_cannot_compile_is_refused_before_anything_is_generated(
    backend: HFLoraBackend, schema: dict[str, Any], problem: str,
) -> None:
    pieces: list[str] = []
    with pytest.raises(InvalidOutputConstraintError, match=problem):
        asyncio.run(backend.generate(PERSON_QUESTION, _params(8, OutputConstraint.json_schema(schema)), (),
                                     pieces.append))
    assert pieces == []
    assert _alone(backend, FRUITS, _params(4), ())[2] == 4  # the engine goes on


# -- the protocols, through the official clients ----------------------------------------------------


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, corpus_store: Path) -> Iterator[str]:
    settings = make_settings(tmp_path_factory.mktemp("structured-server"), vector_store_path=corpus_store,
                             max_new_tokens=96, temperature=0.0)
    with running_server(create_app(settings)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="x", timeout=TIMEOUT_S, max_retries=0)


def test_openai_parse_with_a_pydantic_model_gives_the_object(client: OpenAI) -> None:
    completion = client.chat.completions.parse(model=BASE, messages=PERSON_QUESTION,  # type: ignore[arg-type]
                                               response_format=Person)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person) and message.parsed == Person.model_validate_json(message.content or "")


def test_openai_json_object_and_a_streamed_json_schema_parse(client: OpenAI) -> None:
    plain = client.chat.completions.create(model=BASE, messages=PERSON_QUESTION,  # type: ignore[arg-type]
                                           response_format={"type": "json_object"})
    assert isinstance(json.loads(plain.choices[0].message.content or ""), dict)
    schema = {"name": "person", "schema": Person.model_json_schema(), "strict": True}
    chunks = list(client.chat.completions.create(model=BASE, messages=PERSON_QUESTION,  # type: ignore[arg-type]
                                                 response_format={"type": "json_schema", "json_schema": schema},
                                                 stream=True))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    Person.model_validate_json(streamed)
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"


def test_openai_bad_schemas_and_formats_are_400s_in_openais_envelope(client: OpenAI) -> None:
    broken = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=BASE, messages=PERSON_QUESTION,  # type: ignore[arg-type]
                                       response_format=broken, stream=True)  # type: ignore[typeddict-item]
    assert refused.value.code == "invalid_response_format" and "frobnicate" in refused.value.message
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model=BASE, messages=PERSON_QUESTION,  # type: ignore[arg-type]
                                       response_format={"type": "json_schema"})  # type: ignore[typeddict-item]


@pytest.mark.parametrize("method", ["json_schema", JSON_MODE])
def test_langchain_chat_openai_with_structured_output_returns_the_object(url: str, method: str) -> None:
    chat = ChatOpenAI(base_url=f"{url}/v1", api_key=SecretStr("x"), model=BASE, temperature=0, max_retries=0)
    question = "Describe a person as JSON with the keys name and age."
    shape = Person if method == "json_schema" else Named
    person = chat.with_structured_output(shape, method=method).invoke(question)  # type: ignore[arg-type]
    assert isinstance(person, shape)


def test_ollama_client_format_takes_a_schema_or_json(url: str) -> None:
    client = ollama.Client(host=url, timeout=TIMEOUT_S)
    generated = client.generate(model=BASE, prompt="A person as JSON:", format=Person.model_json_schema())
    Person.model_validate_json(generated.response)
    plain = client.chat(model=BASE, messages=PERSON_QUESTION, format="json")
    assert plain.done_reason == "stop" and isinstance(json.loads(plain.message.content or ""), dict)
    # The client refuses other strings itself; curl does not.
    refused = httpx.post(f"{url}/api/chat", json={"model": BASE, "messages": PERSON_QUESTION, "format": "yaml"})
    assert refused.status_code == 400 and "format" in refused.json()["error"]


@pytest.mark.parametrize("method", ["json_schema", JSON_MODE])
def test_langchain_chat_ollama_with_structured_output_returns_the_object(url: str, method: str) -> None:
    chat = ChatOllama(base_url=url, model=BASE, temperature=0)
    question = "Describe a person as JSON with the keys name and age."
    shape = Person if method == "json_schema" else Named
    person = chat.with_structured_output(shape, method=method).invoke(question)  # type: ignore[arg-type]
    assert isinstance(person, shape)


def test_ask_with_a_response_format_answers_json_from_the_documents(url: str) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 60}},
              "required": ["answer"], "additionalProperties": False}
    body = {"query": "How do I switch models?",
            "response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}}
    reply = httpx.post(f"{url}/ask", json=body, timeout=TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    assert set(json.loads(reply.json()["answer"])) == {"answer"}
    assert reply.json()["source_documents"]
    refused = httpx.post(f"{url}/ask", json={**body, "response_format": {"type": "json_schema", "json_schema": {
        "name": "reply", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}}, timeout=TIMEOUT_S)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_response_format"


def test_ask_with_citations_quotes_the_passages_it_names_word_for_word(url: str) -> None:
    body = {"query": "How many kilograms does a blue basket hold?", "citations": True}
    reply = httpx.post(f"{url}/ask", json=body, timeout=TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    sources = [source["content"] for source in answer["source_documents"]]
    assert answer["answer"] and not answer["answer"].startswith("{")  # the answer, out of its JSON
    for citation in answer["citations"]:
        assert citation["quote"] in sources[citation["source_index"] - 1]
    streamed = httpx.post(f"{url}/ask", json={**body, "stream": True}, timeout=TIMEOUT_S).text
    done = json.loads(streamed.split("event: done\ndata: ")[1].split("\n")[0])
    assert done["answer"] == answer["answer"] and done["citations"] == answer["citations"]
    assert "citations" not in httpx.post(f"{url}/ask", json={"query": body["query"]}, timeout=TIMEOUT_S).json()
    both = httpx.post(f"{url}/ask", json={**body, "response_format": {"type": "json_object"}}, timeout=TIMEOUT_S)
    assert both.status_code == 400 and "citations" in both.json()["message"]
