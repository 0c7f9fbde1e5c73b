"""Keys, limits and bounded work, on an app running the Ollama backend against the wire-protocol server."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.security import required_role
from app.config import SettingsError, load_settings
from app.main import create_app
from tests.conftest import CORPUS, make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

USER_KEY = "user-SENTINEL-6f1c2a"
ADMIN_KEY = "admin-SENTINEL-93bd7e"


def _app(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer, **overrides: object):  # type: ignore[no-untyped-def]
    values: dict[str, object] = {"vector_store_path": corpus_store, "use_lora_default": False,
                                 "ollama_base_url": ollama.base_url, "api_keys": USER_KEY, "admin_api_keys": ADMIN_KEY}
    values.update(overrides)
    return create_app(make_settings(tmp_path, **values))


def _registered(routes: list[Any], prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, walking into included routers."""
    found = []
    for route in routes:
        if isinstance(getattr(route, "methods", None), set):
            found += [(method, prefix + route.path) for method in sorted(route.methods) if method != "HEAD"]
        elif hasattr(route, "original_router"):  # FastAPI's wrapper around an included router
            found += _registered(route.original_router.routes, prefix + route.include_context.prefix)
    return found


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _refused(response: httpx.Response, status: int, code: str) -> bool:
    """`status` with `code`, in the envelope of the path's API: ours, OpenAI's on /v1 (the code nested), or
    Ollama's on /api (a message only)."""
    error = response.json()["error"]
    found = error["code"] if isinstance(error, dict) else error
    return response.status_code == status and (response.url.path.startswith("/api/") or found == code)


def test_every_registered_route_is_guarded(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = tmp_path / "store"  # the admin rebuild below writes to it
    shutil.copytree(corpus_store, store)
    app = _app(tmp_path, store, ollama, sample_corpus_path=CORPUS)
    routes = [(method, path.replace("{", "").replace("}", "")) for method, path in _registered(app.routes)]
    assert len(routes) >= 15
    assert {("POST", "/admin/vector-store/rebuild"), ("GET", "/admin/vector-store/versions"),
            ("POST", "/admin/vector-store/rollback")} <= set(routes)
    bodies: list[str] = []
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for method, path in routes:
            role = required_role(path)
            anonymous = client.request(method, path, json={})
            as_user = client.request(method, path, json={}, headers=_auth(USER_KEY))
            as_admin = client.request(method, path, json={}, headers=_auth(ADMIN_KEY))
            bodies += [anonymous.text, as_user.text, as_admin.text]
            if role == "open":
                assert anonymous.status_code not in (401, 403), path
                continue
            assert _refused(anonymous, 401, "unauthorized"), path
            assert as_admin.status_code not in (401, 403), path
            if role == "admin":
                assert _refused(as_user, 403, "forbidden"), path
            else:
                assert as_user.status_code not in (401, 403), path
        wrong = client.get("/model_info", headers=_auth("not-a-key"))
        assert wrong.status_code == 401
        for variant in ("/admin/adapters/", "/ADMIN/adapters", "/admin%2Fadapters", "/admin//adapters",
                        "/admin/%2E%2E/admin/adapters", "/V1/LOAD_LORA_ADAPTER"):
            response = client.request("GET", variant, headers=_auth(USER_KEY))
            assert response.status_code == 403, variant
        info = client.get("/model_info", headers=_auth(ADMIN_KEY)).text
        health = client.get("/health", headers=_auth(ADMIN_KEY)).text
    everything = "\n".join([*bodies, info, health, caplog.text])
    assert "SENTINEL" not in everything


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> None:
    app = _app(tmp_path, corpus_store, ollama, rate_limit_per_minute=3)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60, headers=_auth(USER_KEY)) as client:
        codes = [client.get("/model_info").status_code for _ in range(4)]
        limited = client.get("/model_info")
        other_key = client.get("/model_info", headers=_auth(ADMIN_KEY))
        live = client.get("/health/live")
    assert codes == [200, 200, 200, 429]
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"] == "rate_limited"
    assert other_key.status_code == 200 and live.status_code == 200


def test_body_over_the_limit_is_413(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> None:
    app = _app(tmp_path, corpus_store, ollama, max_body_bytes=2048)
    with running_server(app) as url:
        response = httpx.post(f"{url}/ask", content=b'{"query": "' + b"x" * 5000 + b'"}', headers=_auth(USER_KEY))
    assert response.status_code == 413 and "MAX_BODY_BYTES" in response.json()["message"]


def test_curl_style_form_content_type_is_read_as_json(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    app = _app(tmp_path, corpus_store, ollama)
    with running_server(app) as url:
        response = httpx.post(f"{url}/ask", content=b'{"query": "ferry?"}', timeout=60,
                              headers={**_auth(USER_KEY), "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200 and response.json()["model_used"] == "ollama"


def test_beyond_capacity_and_queue_the_answer_is_a_fast_503(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    ollama.token_delay = 0.3  # each answer takes a few seconds
    app = _app(tmp_path, corpus_store, ollama, max_concurrent_generations=1, max_queued_requests=1,
               rate_limit_per_minute=0)

    async def run(url: str) -> list[tuple[int, float, str | None]]:
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=_auth(USER_KEY)) as client:
            async def one(i: int) -> tuple[int, float, str | None]:
                started = asyncio.get_running_loop().time()
                response = await client.post("/ask", json={"query": f"ferry {i}?"})
                elapsed = asyncio.get_running_loop().time() - started
                return response.status_code, elapsed, response.headers.get("Retry-After")
            return await asyncio.gather(*(one(i) for i in range(6)))

    with running_server(app) as url:
        results = asyncio.run(run(url))
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(served) == 2 and len(refused) == 4
    assert all(r[2] is not None and r[1] < 2.0 for r in refused)


def test_overall_deadline_answers_504(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> None:
    ollama.token_delay = 0.5
    app = _app(tmp_path, corpus_store, ollama, request_timeout_seconds=1.0)
    with running_server(app) as url:
        response = httpx.post(f"{url}/ask", json={"query": "ferry?"}, headers=_auth(USER_KEY), timeout=60)
    assert response.status_code == 504 and "REQUEST_TIMEOUT_SECONDS" in response.json()["message"]


def test_network_bind_without_keys_needs_explicit_consent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    with pytest.raises(SettingsError, match="ALLOW_UNAUTHENTICATED"):
        load_settings(_env_file=None)
    monkeypatch.setenv("ALLOW_UNAUTHENTICATED", "true")
    assert load_settings(_env_file=None).api_host == "0.0.0.0"
    monkeypatch.delenv("ALLOW_UNAUTHENTICATED")
    monkeypatch.setenv("API_KEYS", "k1,k2")
    assert load_settings(_env_file=None).api_key_list == ["k1", "k2"]
    assert "k1" not in repr(load_settings(_env_file=None))
