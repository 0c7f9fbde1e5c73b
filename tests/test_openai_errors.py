"""OpenAI's error envelope on /v1/*, read by the official `openai` client: its typed errors for our statuses.

The app runs with the Ollama backend active (the wire-protocol server), so nothing here loads the local
model: every error below is decided before a generation would start.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

USER_KEY = "user-key-openai-errors"
OTHER_KEY = "other-key-openai-errors"  # a bucket of its own, after the first test spent USER_KEY's
QUESTION = [{"role": "user", "content": "Name three fruits."}]
BASE = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("openai-errors")
    with OllamaWireServer(models=["qwen3:4b"]) as ollama:
        settings = make_settings(folder, use_lora_default=False, ollama_base_url=ollama.base_url,
                                 api_keys=f"{USER_KEY},{OTHER_KEY}", rate_limit_per_minute=8, max_body_bytes=4096)
        with running_server(create_app(settings)) as base_url:
            yield base_url


def _client(url: str, key: str = USER_KEY) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, timeout=60, max_retries=0)


def _create(client: OpenAI, **request: Any) -> Any:
    return client.chat.completions.create(**request)


def _assert_envelope(error: openai.APIStatusError, code: str, kind: str) -> None:
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["type"] == kind, body
    assert error.code == code and error.type == kind and error.message


def test_errors_raise_the_clients_typed_errors(url: str) -> None:
    """One test, as the rate limit below counts every request of this key."""
    client = _client(url)
    with pytest.raises(openai.NotFoundError) as unknown:
        _create(client, model="no-such-adapter", messages=QUESTION)
    _assert_envelope(unknown.value, "model_not_found", "invalid_request_error")
    assert "no-such-adapter" in unknown.value.message and BASE in unknown.value.message

    for stream in (False, True):  # refused before a stream begins: the same JSON error either way
        with pytest.raises(openai.BadRequestError) as unsupported:
            _create(client, model=BASE, messages=QUESTION, logit_bias={"1": 5}, stream=stream)
        _assert_envelope(unsupported.value, "unsupported_parameter", "invalid_request_error")

    # A schema violation is OpenAI's 400 invalid_request_error (never 422 on /v1), naming the field in `param`.
    with pytest.raises(openai.BadRequestError) as invalid:
        _create(client, model=BASE, messages=QUESTION, temperature=5.0)
    _assert_envelope(invalid.value, "validation_error", "invalid_request_error")
    assert invalid.value.param == "temperature"

    with pytest.raises(openai.APIStatusError) as too_long:  # over MAX_BODY_BYTES: the guard's 413, OpenAI-shaped
        _create(client, model=BASE, messages=[{"role": "user", "content": "x" * 5000}])
    assert too_long.value.status_code == 413
    _assert_envelope(too_long.value, "payload_too_large", "invalid_request_error")

    with pytest.raises(openai.RateLimitError) as limited:
        for _ in range(10):
            client.models.list()
    _assert_envelope(limited.value, "rate_limited", "rate_limit_error")
    assert int(limited.value.response.headers["Retry-After"]) >= 1


def test_bad_key_is_an_authentication_error_and_our_routes_keep_our_envelope(url: str) -> None:
    with pytest.raises(openai.AuthenticationError) as denied:
        _client(url, key="wrong-key").models.list()
    _assert_envelope(denied.value, "unauthorized", "authentication_error")
    ours = httpx.post(f"{url}/ask", json={"query": "hi"}, headers={"Authorization": "Bearer wrong-key"})
    assert ours.status_code == 401 and ours.json() == {"error": "unauthorized", "message": "the API key is not valid"}


def test_our_api_keeps_422_for_invalid_fields(url: str) -> None:
    response = httpx.post(f"{url}/ask", json={"query": 3}, headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert response.status_code == 422 and response.json()["error"] == "validation_error"
