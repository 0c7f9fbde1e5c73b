"""Tool calls on /v1 through the official `openai` client and LangChain's `ChatOpenAI`, on a live server with the
embedded SmolLM2 (whose chat template has no tool support: the tools, calls and results are written in the Hermes
format of `app.llm.tools`). A forced call (`tool_choice` required or named) is held to that format by the grammar,
so its arguments validate against the tool's schema however small the model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import ollama
import openai
import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from app.api.schemas import ToolParam
from app.llm.base import Tool, ToolCall, ToolUse
from app.llm.model_source import resolve_base_model
from app.llm.tools import conversation, read_calls
from app.main import create_app
from tests.adapter_training import train_word_adapter
from tests.conftest import make_settings, running_server

BASE = "SmolLM2-135M-Instruct"
TIMEOUT_S = 120.0
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    """The current weather in a city."""

    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=30)
    unit: Literal["celsius", "fahrenheit"]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                            "parameters": Weather.model_json_schema()}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now in a time zone",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                                                                 "maxLength": 30}},
                                                        "required": ["zone"], "additionalProperties": False}}}


# -- reading and writing the format, without a model -------------------------------------------------------------


def test_calls_are_read_from_their_blocks_and_what_is_not_a_call_stays_text() -> None:
    tools = ToolUse((Tool("get_weather"),), "auto")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    unknown = '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>'
    text, calls = read_calls(f"Let me look.\n{call}\n{call}\n<tool_call>\n{{\"name\": \"get_w", tools)
    assert text == "Let me look." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]  # the repeat is made once; the unfinished block is dropped
    assert read_calls(unknown, tools) == (unknown, ())  # not a tool of the request: left as the model wrote it
    assert read_calls("<tool_call>not json</tool_call>", tools) == ("<tool_call>not json</tool_call>", ())


def test_a_template_without_tools_gets_them_in_the_system_message_and_results_as_user_turns() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    messages: list[Any] = [{"role": "user", "content": "Weather?"},
                           {"role": "assistant", "content": "", "tool_calls": (call,)},
                           {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
                           {"role": "tool", "content": "clear", "tool_call_id": "call_1"}]
    shown = conversation(messages, ToolUse((Tool("get_weather", "weather"),)), native=False)
    assert [turn["role"] for turn in shown] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in shown[0]["content"] and "<tools>" in shown[0]["content"]
    assert shown[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert shown[3]["content"] == "<tool_response>\n18 C\n</tool_response>\n<tool_response>\nclear\n</tool_response>"


# -- a live server ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`weather`: an adapter fine-tuned (briefly, for real) to answer any question with a call of get_weather, shown
    the tools as a model without tool support is shown them here."""
    folder = tmp_path_factory.mktemp("tool-adapters")
    offered = ToolUse((ToolParam.model_validate(WEATHER).to_tool("tools[0]"),))
    system = conversation([{"role": "user", "content": ""}], offered, native=False)[0]["content"]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    train_word_adapter(resolve_base_model("embedded:SmolLM2-135M-Instruct", None), "", folder / "weather", steps=30,
                       answer=call + "<|im_end|>", system=system)
    return folder


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, corpus_store: Path, adapters: Path) -> Iterator[str]:
    settings = make_settings(tmp_path_factory.mktemp("tools"), vector_store_path=corpus_store, max_new_tokens=64,
                             temperature=0.0, lora_adapters_dir=adapters)
    with running_server(create_app(settings)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="x", timeout=TIMEOUT_S, max_retries=0)


def _call(client: OpenAI, **request: Any) -> Any:
    return client.chat.completions.create(model=BASE, messages=QUESTION, **request)  # type: ignore[call-overload]


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_has_arguments_valid_for_its_tool_streamed_or_not(client: OpenAI, choice: Any) -> None:
    completion = _call(client, tools=[TIME, WEATHER], tool_choice=choice)
    (call,) = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls" and completion.choices[0].message.content is None
    if choice != "required":
        assert call.function.name == "get_weather"
    if call.function.name == "get_weather":
        Weather.model_validate_json(call.function.arguments)
    assert call.id.startswith("call_") and call.type == "function"
    chunks = list(_call(client, tools=[TIME, WEATHER], tool_choice=choice, stream=True))
    pieces = [piece for chunk in chunks if chunk.choices for piece in chunk.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function.name == call.function.name  # id and name first, then arguments
    assert "".join(piece.function.arguments or "" for piece in pieces) == call.function.arguments
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "tool_calls"
    assert not any(chunk.choices[0].delta.content for chunk in chunks if chunk.choices)  # no call text as content


@pytest.mark.slow
def test_a_tool_result_fed_back_gives_a_text_answer(client: OpenAI) -> None:
    first = _call(client, tools=[WEATHER], tool_choice="required").choices[0].message
    call = first.tool_calls[0]
    messages = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 18, "sky": "clear"})}]
    answer = client.chat.completions.create(model=BASE, messages=messages, tools=[WEATHER],  # type: ignore[arg-type]
                                            tool_choice="none")
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content
    assert answer.choices[0].message.tool_calls is None


@pytest.mark.slow
@pytest.mark.parametrize(("request_fields", "message"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "get_time"),
    ({"tool_choice": "required"}, "no tools"),
    ({"tools": [WEATHER, WEATHER]}, "same name"),
    ({"tools": [{"type": "function", "function": {"name": "broken", "parameters": {"type": "frobnicate"}}}],
      "tool_choice": "required"}, "frobnicate"),
])
def test_what_a_call_cannot_be_is_a_400_in_openais_envelope(
    client: OpenAI, request_fields: dict[str, Any], message: str,
) -> None:
    with pytest.raises(openai.BadRequestError, match=message) as refused:
        _call(client, **request_fields)
    assert refused.value.status_code == 400


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """The current weather in a city."""
    return f"18 {unit} in {city}"


@pytest.mark.slow
def test_langchain_bind_tools_with_a_forced_choice_returns_tool_calls(url: str) -> None:
    chat = ChatOpenAI(base_url=f"{url}/v1", api_key=SecretStr("x"), model=BASE, temperature=0, max_retries=0)
    reply = chat.bind_tools([get_weather], tool_choice="get_weather").invoke(QUESTION[0]["content"])
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    assert get_weather.invoke(call["args"]).startswith("18 ")


@pytest.mark.slow
def test_langchain_with_structured_output_by_function_calling_returns_the_object(url: str) -> None:
    chat = ChatOpenAI(base_url=f"{url}/v1", api_key=SecretStr("x"), model=BASE, temperature=0, max_retries=0)
    weather = chat.with_structured_output(Weather, method="function_calling").invoke(QUESTION[0]["content"])
    assert isinstance(weather, Weather)


@pytest.mark.slow
@pytest.mark.numerics  # a fine-tuned adapter's own choice: checked on AVX2 too
def test_an_adapter_trained_on_the_format_calls_the_tool_when_free_to_choose(client: OpenAI) -> None:
    completion = client.chat.completions.create(model="weather", messages=QUESTION,  # type: ignore[arg-type]
                                                tools=[WEATHER])  # tool_choice auto: the model decides
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and completion.choices[0].finish_reason == "tool_calls"
    Weather.model_validate_json(call.function.arguments)
    plain = client.chat.completions.create(model=BASE, messages=QUESTION, tools=[WEATHER])  # type: ignore[arg-type]
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content  # the base answers


@pytest.mark.slow
@pytest.mark.numerics  # a fine-tuned adapter's own choice: checked on AVX2 too
def test_ollama_tools_give_tool_calls_streamed_or_not_and_results_go_back(url: str) -> None:
    client = ollama.Client(host=url, timeout=TIMEOUT_S)
    reply = client.chat(model="weather", messages=QUESTION, tools=[WEATHER])
    (call,) = reply.message.tool_calls or []
    assert call.function.name == "get_weather" and reply.done_reason == "stop"
    Weather.model_validate(call.function.arguments)
    streamed = [call for chunk in client.chat(model="weather", messages=QUESTION, tools=[WEATHER], stream=True)
                for call in chunk.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [(call.function.name,
                                                                            call.function.arguments)]
    history = [*QUESTION, reply.message, {"role": "tool", "content": "18 celsius, clear", "tool_name": "get_weather"}]
    answer = client.chat(model=BASE, messages=history, tools=[WEATHER])
    assert answer.message.content and not answer.message.tool_calls


@pytest.mark.slow
@pytest.mark.numerics  # a fine-tuned adapter's own choice: checked on AVX2 too
def test_langchain_chat_ollama_bind_tools_returns_tool_calls(url: str) -> None:
    chat = ChatOllama(base_url=url, model="weather", temperature=0)
    reply = chat.bind_tools([WEATHER]).invoke(QUESTION[0]["content"])
    assert [call["name"] for call in reply.tool_calls] == ["get_weather"]
    Weather.model_validate(reply.tool_calls[0]["args"])


@pytest.mark.slow
def test_a_langchain_agent_loop_with_one_tool_runs_to_a_final_answer(url: str) -> None:
    chat = ChatOpenAI(base_url=f"{url}/v1", api_key=SecretStr("x"), model=BASE, temperature=0, max_retries=0)
    messages: list[BaseMessage] = [HumanMessage(QUESTION[0]["content"])]
    for turn in range(4):  # the first turn must look the weather up; then the model decides
        reply = chat.bind_tools([get_weather], tool_choice="get_weather" if turn == 0 else "auto").invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        messages += [get_weather.invoke(call) for call in reply.tool_calls]  # ToolMessages with the call ids
    assert isinstance(messages[2], ToolMessage) and messages[2].content.startswith("18 ")
    assert isinstance(messages[-1], AIMessage) and messages[-1].content and not messages[-1].tool_calls
