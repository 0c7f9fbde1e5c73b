"""Request text that is not valid Unicode (a lone surrogate, which JSON can escape) is refused with 422
naming the field, on every route; a query of only invisible characters counts as empty.

The app runs on the Ollama wire server: every refusal here happens before any model would be needed.
"""

from __future__ import annotations

import importlib
import pkgutil
import typing
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel

import app.api
from app.api.schemas import RequestModel
from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

MODEL = "SmolLM2-135M-Instruct"
LONE = "\\ud800"  # as it stands in the JSON text: the escape, which json.loads turns into a lone surrogate


@pytest.fixture()
def url(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> Iterator[str]:
    settings = make_settings(
        tmp_path, vector_store_path=corpus_store, use_lora_default=False, ollama_base_url=ollama.base_url
    )
    with running_server(create_app(settings)) as base_url:
        yield base_url


def _post(url: str, path: str, raw_json: str) -> httpx.Response:
    """Send `raw_json` byte for byte: httpx's `json=` would refuse to encode a lone surrogate."""
    return httpx.post(
        f"{url}{path}", content=raw_json.encode(), headers={"Content-Type": "application/json"}, timeout=60
    )


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/ask", f'{{"query": "{LONE}"}}', "query"),
        ("/ask", f'{{"query": "orchards {LONE} apples", "stream": true}}', "query"),
        ("/ask", f'{{"query": "ok", "adapter": "{LONE}"}}', "adapter"),
        ("/ask", f'{{"query": "ok", "lora_adapter_ids": ["a", "b{LONE}"]}}', "lora_adapter_ids"),
        ("/ask", f'{{"query": "ok", "adapters": [{{"name": "{LONE}", "weight": 1}}]}}', "adapters.0.name"),
        ("/v1/chat/completions", f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "{LONE}"}}]}}',
         "messages.0.content"),
        ("/v1/chat/completions",
         f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": [{{"type": "text", "text": "{LONE}"}}]}}]}}',
         "messages.0.content.list[ContentPart].0.text"),
        ("/v1/chat/completions", f'{{"model": "{LONE}", "messages": [{{"role": "user", "content": "hi"}}]}}', "model"),
        ("/v1/chat/completions",
         f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "metadata": {{"{LONE}": "x"}}}}',
         "metadata"),
        ("/admin/load-lora-adapter", f'{{"lora_name": "{LONE}", "lora_path": "alpha"}}', "lora_name"),
        ("/admin/load-lora-adapter", f'{{"lora_name": "alpha", "lora_path": "al{LONE}pha"}}', "lora_path"),
        ("/v1/load_lora_adapter", f'{{"lora_name": "{LONE}", "lora_path": "alpha"}}', "lora_name"),
        ("/admin/unload-lora-adapter", f'{{"lora_name": "{LONE}"}}', "lora_name"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_the_field(url: str, path: str, body: str, field: str) -> None:
    """422 on our routes; on /v1, OpenAI's 400 invalid_request_error (OpenAI never answers 422)."""
    response = _post(url, path, body)
    if path.startswith("/v1/"):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        message = error["message"]
    else:
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "validation_error"
        message = response.json()["message"]
    problems = dict(part.split(": ", 1) for part in message.split("; "))
    assert "unicode" in problems[field].lower(), problems  # pydantic's own words, or ours


@pytest.mark.parametrize(
    "query",  # JSON escapes: zero-width space and joiner, byte-order mark, word joiner, soft hyphen, NUL, BEL...
    ["\\u200b", "\\u200b\\u200d\\ufeff", " \\u2060 \\u00ad ", "\\u0000\\u0007\\u001b", "\\t\\u0085"],
)
def test_a_query_of_only_control_or_zero_width_characters_is_empty(url: str, query: str) -> None:
    response = _post(url, "/ask", f'{{"query": "{query}"}}')
    assert response.status_code == 422, response.text
    assert response.json() == {"error": "validation_error", "message": "query must not be empty"}


def test_rag_chat_whose_user_message_is_only_zero_width_is_refused_as_a_blank_one(url: str) -> None:
    def rag_chat(content: str) -> httpx.Response:
        messages = f'[{{"role": "user", "content": "{content}"}}]'
        return _post(url, "/v1/chat/completions", f'{{"model": "{MODEL}", "rag": true, "messages": {messages}}}')

    blank, invisible = rag_chat(" "), rag_chat("\\u200b\\u200d")
    assert blank.status_code == invisible.status_code == 400, invisible.text
    assert invisible.json() == blank.json()
    assert "rag: true needs a user message with text" in invisible.json()["error"]["message"]


def test_chinese_text_and_emoji_are_still_answered(url: str, ollama: OllamaWireServer) -> None:
    # The emoji arrives once as UTF-8 and once as the JSON escape of its surrogate pair, which is valid text.
    response = _post(url, "/ask", '{"query": "渡轮几点开？ 🚢 \\ud83d\\ude00 cafe\\u0301"}')
    assert response.status_code == 200, response.text
    assert ollama.bodies("/api/chat")[-1]["messages"][-1]["content"] == "渡轮几点开？ 🚢 😀 cafe\u0301"


def test_every_request_body_model_checks_its_text() -> None:
    """The check lives in `RequestModel`: a body model (or a model nested in one) on another base would
    let lone surrogates through to the tokenizer. Every router module of app.api is looked at."""
    modules = [importlib.import_module(f"app.api.{info.name}") for info in pkgutil.iter_modules(app.api.__path__)]
    routers = [module.router for module in modules if isinstance(getattr(module, "router", None), APIRouter)]
    bodies = {
        model
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute)
        for name, hint in typing.get_type_hints(route.endpoint).items()
        if name != "return"
        for model in _models_in(hint)
    }
    assert {"AskRequest", "ChatCompletionRequest", "LoadAdapterRequest", "RebuildRequest"} <= {
        body.__name__ for body in bodies
    }
    models = set(bodies)
    pending = list(bodies)
    while pending:
        model = pending.pop()
        for field in model.model_fields.values():
            for nested in _models_in(field.annotation):
                if nested not in models:
                    models.add(nested)
                    pending.append(nested)
    assert {model.__name__ for model in models if not issubclass(model, RequestModel)} == set()


def _models_in(annotation: object) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for argument in typing.get_args(annotation):
        yield from _models_in(argument)


@pytest.mark.parametrize(
    ("path", "body", "fields"),
    [
        ("/ask", {"query": "apples?", "precision": "float16"}, ["precision"]),
        ("/switch_model", {"backend": "ollama", "device": "cuda"}, ["device"]),
        # seed 002's admin load, whose per-adapter precision and device were silently dropped
        ("/admin/load-lora-adapter", {"lora_name": "sql", "lora_path": "sql", "precision": "bfloat16",
                                      "device": "cuda:0"}, ["precision", "device"]),
        ("/admin/unload-lora-adapter", {"lora_name": "sql", "force": True}, ["force"]),
    ],
)
def test_an_unknown_field_of_our_own_routes_is_a_422_naming_it(
    url: str, path: str, body: dict[str, object], fields: list[str]
) -> None:
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert response.status_code == 422, response.text
    for field in fields:
        assert f"{field}: not a field of this request" in response.json()["message"]


def test_vllms_routes_keep_vllms_rule_and_ignore_fields_they_do_not_use(url: str) -> None:
    response = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "absent", "load_inplace": True},
                          timeout=60)
    assert response.status_code == 404  # the adapter, not the field
