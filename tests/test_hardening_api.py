"""Backend switching is an admin action that refuses a backend unable to serve; key guessing is throttled per
client address; user keys see no absolute paths; HEAD answers on GET routes; /docs needs no CDN. All on real
servers on loopback, the Ollama backend talking to the wire-protocol server."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

USER_KEY = "user-key-hardening"
ADMIN_KEY = "admin-key-hardening"
USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _ollama_app(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer, **overrides: Any) -> FastAPI:
    values: dict[str, Any] = {"vector_store_path": corpus_store, "use_lora_default": False,
                              "ollama_base_url": ollama.base_url, "api_keys": USER_KEY, "admin_api_keys": ADMIN_KEY}
    return create_app(make_settings(tmp_path, **{**values, **overrides}))


@contextmanager
def _client(app: FastAPI, **options: Any) -> Iterator[httpx.Client]:
    """A client of `app` served on loopback."""
    with running_server(app) as url, httpx.Client(base_url=url, **{"timeout": 60, **options}) as client:
        yield client


def _strings(value: Any) -> list[str]:
    """Every string in a JSON value, dict keys included."""
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in [key, *_strings(item)]]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_switch_model_needs_an_admin_key_and_refuses_an_ollama_that_is_down(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    with _client(_ollama_app(tmp_path, corpus_store, ollama)) as client:
        as_user = client.post("/switch_model", json={"use_lora": False}, headers=USER)
        own_choice = client.post("/ask", json={"query": "ferry?", "use_lora": False}, headers=USER)
        as_admin = client.post("/switch_model", json={"use_lora": False}, headers=ADMIN)
        ollama.stop()  # its port is closed now
        refused = client.post("/switch_model", json={"use_lora": False}, headers=ADMIN)
    assert as_user.status_code == 403 and as_user.json()["error"] == "forbidden"
    assert own_choice.status_code == 200 and own_choice.json()["model_used"] == "ollama"  # per request: a user's call
    assert as_admin.status_code == 200 and as_admin.json()["active_backend"] == "ollama"
    assert refused.status_code == 503 and refused.json()["error"] == "backend_unavailable"
    assert "ollama serve" in refused.json()["message"]


@pytest.mark.slow
def test_a_switch_to_an_ollama_that_cannot_serve_changes_nothing(tmp_path: Path, corpus_store: Path) -> None:
    with OllamaWireServer(models=[]) as ollama:  # reachable, but OLLAMA_MODEL is not pulled
        settings = make_settings(tmp_path, vector_store_path=corpus_store, ollama_base_url=ollama.base_url)
        with _client(create_app(settings), timeout=120) as client:
            not_pulled = client.post("/switch_model", json={"use_lora": False})
            info_after_refusal = client.get("/model_info").json()
            ollama.models = ["qwen3:4b"]
            switched = client.post("/switch_model", json={"use_lora": False})
            back = client.post("/switch_model", json={"use_lora": True})
            ollama.stop()  # its port is closed now
            down = client.post("/switch_model", json={"use_lora": False})
            info_after_down = client.get("/model_info").json()
            health = client.get("/health")
            answer = client.post("/ask", json={"query": "flat tyre fee?"})
    assert not_pulled.status_code == 503 and "ollama pull qwen3:4b" in not_pulled.json()["message"]
    assert info_after_refusal["active_backend"] == "lora" and info_after_refusal["using_lora"] is True
    assert switched.status_code == 200 and switched.json()["active_backend"] == "ollama"
    assert back.status_code == 200 and back.json()["active_backend"] == "lora"
    assert down.status_code == 503 and down.json()["error"] == "backend_unavailable"
    assert "ollama serve" in down.json()["message"] and "stay on the lora backend" in down.json()["message"]
    assert info_after_down["active_backend"] == "lora"
    assert health.status_code == 200 and health.json()["status"] == "degraded"  # LoRA serves, Ollama is down
    assert answer.status_code == 200 and answer.json()["model_used"] == "base"


def test_repeated_invalid_keys_from_one_address_are_throttled(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    app = _ollama_app(tmp_path, corpus_store, ollama, auth_failure_limit=3, auth_failure_window_seconds=3.0)
    bad = {"Authorization": "Bearer not-a-key"}
    other_address = httpx.HTTPTransport(local_address="127.0.0.2")
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client, \
            httpx.Client(base_url=url, timeout=60, transport=other_address) as neighbour:
        guesses = [client.get("/model_info", headers=bad).status_code for _ in range(3)]
        throttled = client.get("/model_info", headers=bad)
        good_key_meanwhile = client.get("/model_info", headers=USER)
        probe = client.get("/health/live")
        elsewhere = neighbour.get("/model_info", headers=USER)
        time.sleep(int(throttled.headers["Retry-After"]) + 0.2)  # the oldest failure has left the window
        later = client.get("/model_info", headers=USER)
    assert guesses == [401, 401, 401]
    assert throttled.status_code == 429 and throttled.json()["error"] == "auth_throttled"
    assert 1 <= int(throttled.headers["Retry-After"]) <= 3
    # While throttled no key is checked: a 200 for a good key would tell a right guess from a wrong one.
    assert good_key_meanwhile.status_code == 429
    assert probe.status_code == 200 and elsewhere.status_code == 200
    assert later.status_code == 200


def test_user_keys_see_no_absolute_paths_and_admin_keys_see_them(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    base_model = tmp_path / "models" / "absent-base"  # named in /model_info and in /health's lora_model detail
    cache_dir = Path.cwd() / "hardening-cache" / "hf"  # below the working directory: shown relative to it
    app = _ollama_app(tmp_path, corpus_store, ollama, base_model_name=str(base_model), cache_dir=cache_dir)
    with _client(app) as client:
        user_info = client.get("/model_info", headers=USER).json()
        user_health = client.get("/health", headers=USER).json()
        admin_info = client.get("/model_info", headers=ADMIN).json()
        admin_health = client.get("/health", headers=ADMIN).json()
    for report in (user_info, user_health):
        assert not [text for text in _strings(report) if re.search(r"(^|\s)/", text)], report
    assert user_info["vector_store_path"] == corpus_store.name
    assert user_info["lora_model_path"] == "no-adapter" and user_info["base_model"] == "absent-base"
    assert user_info["cache_dir"] == "hardening-cache/hf"
    assert user_info["ollama_base_url"] == ollama.base_url  # a URL is not a file path
    assert user_health["details"]["model_info"] == user_info
    assert user_health["details"]["components"]["lora_model"].startswith("no folder absent-base: ")
    assert admin_info["vector_store_path"] == str(corpus_store) and admin_info["cache_dir"] == str(cache_dir)
    assert admin_info["base_model"] == str(base_model)
    assert str(base_model) in admin_health["details"]["components"]["lora_model"]


def test_head_answers_like_get_without_a_body(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> None:
    with _client(_ollama_app(tmp_path, corpus_store, ollama)) as client:
        pairs = {path: (client.head(path, headers=USER), client.get(path, headers=USER))
                 for path in ("/health/live", "/health/ready", "/model_info", "/health")}
        anonymous = client.head("/model_info")
        post_only = client.head("/ask", headers=USER)
    for path, (head, get) in pairs.items():
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and get.content, path
        assert head.headers["content-type"] == get.headers["content-type"] == "application/json", path
    assert pairs["/health/live"][0].headers["content-length"] == str(len(pairs["/health/live"][1].content))
    assert anonymous.status_code == 401 and anonymous.content == b""
    assert post_only.status_code == 405 and post_only.headers["Allow"] == "POST"


def test_docs_pages_load_their_assets_from_the_service_itself(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    with _client(_ollama_app(tmp_path, corpus_store, ollama), headers=USER) as client:
        pages = {page: client.get(page) for page in ("/docs", "/redoc")}
        assets = {
            asset: client.get(asset)
            for page in pages.values()
            for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text)
        }
        openapi = client.get("/openapi.json")
    for page, response in pages.items():
        assert response.status_code == 200 and "text/html" in response.headers["content-type"], page
        assert not re.search(r"(?:src|href)=\"(?:https?:)?//", response.text), page
        assert "cdn" not in response.text.lower(), page
    assert {"/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/swagger-ui.css",
            "/static-offline-docs/redoc.standalone.js"} <= set(assets)
    assert all(response.status_code == 200 and response.content for response in assets.values()), assets
    assert openapi.status_code == 200 and openapi.json()["info"]["title"] == "lora-rag"
