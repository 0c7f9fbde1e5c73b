"""The service on the real SmolLM2 model (no adapter here: it serves the base model and says so)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaWireServer]:
    with OllamaWireServer(models=["qwen3:4b"], token_delay=0.01) as server:
        yield server


@pytest.fixture(scope="module")
def service_url(
    tmp_path_factory: pytest.TempPathFactory, corpus_store: Path, ollama: OllamaWireServer
) -> Iterator[str]:
    settings = make_settings(
        tmp_path_factory.mktemp("lora"), vector_store_path=corpus_store, ollama_base_url=ollama.base_url
    )
    with running_server(create_app(settings)) as url:
        yield url


def test_ask_answers_with_the_real_model_and_the_right_source(service_url: str) -> None:
    response = httpx.post(
        f"{service_url}/ask", json={"query": "How many kilograms does a blue basket hold?"}, timeout=120
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_used"] == "base"  # no adapter at LORA_MODEL_PATH
    assert body["answer"].strip()
    assert body["source_documents"][0]["metadata"]["source"] == "corpus/orchards.md"
    assert 0 < body["processing_time"] < 120
    assert 0 < body["usage"]["completion_tokens"] <= 24


def test_chinese_question_gets_chinese_sources_in_plain_utf8(service_url: str) -> None:
    response = httpx.post(f"{service_url}/ask", json={"query": "茶园的参观费用是多少？"}, timeout=120)
    assert response.status_code == 200
    assert response.json()["source_documents"][0]["metadata"]["source"] == "corpus/zh/茶园.md"
    assert "云雾茶园".encode() in response.content  # not \\u-escaped


def test_model_info_and_health_report_the_base_model_without_adapter(service_url: str) -> None:
    info = httpx.get(f"{service_url}/model_info", timeout=30).json()
    for field in ("base_model", "lora_model_path", "lora_exists", "using_lora", "cache_dir",
                  "vector_store_path", "embedding_model", "device", "quantization", "ollama_model"):
        assert field in info
    assert info["lora_exists"] is False and info["using_lora"] is True and info["device"] == "cpu"
    # which numbers the model runs in, and why: auto measured a typical answer's cost in each candidate here
    numeric_path = info["numeric_path"]
    assert numeric_path["reason"].startswith("auto") and numeric_path["name"] in {"bfloat16", "float32", "int8"}
    assert numeric_path["typical_answer"] == {"prompt_tokens": 721, "answer_tokens": 24}  # MAX_NEW_TOKENS=24 here
    measured = {row["path"]: row for row in numeric_path["measured"]}
    assert {"float32", "int8"} <= set(measured) and numeric_path["name"] in measured
    fastest = min(row["answer_seconds"] for row in measured.values())
    assert measured[numeric_path["name"]]["answer_seconds"] <= fastest * 1.05
    assert info["dtype"] == ("bfloat16" if numeric_path["name"] != "float32" else "float32")
    health = httpx.get(f"{service_url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    # The design card's shape: each component a boolean; in words in component_status.
    components = ("rag_handler", "vector_store", "lora_model", "ollama_service")
    assert health.json()["components"] == dict.fromkeys(components, True)
    assert health.json()["component_status"] == dict.fromkeys(components, "healthy")


def test_use_lora_false_overrides_for_one_request_only(service_url: str) -> None:
    ollama_answer = httpx.post(f"{service_url}/ask", json={"query": "ferry times?", "use_lora": False}, timeout=60)
    assert ollama_answer.json()["model_used"] == "ollama"
    assert httpx.get(f"{service_url}/model_info", timeout=30).json()["using_lora"] is True


def test_switch_while_requests_are_in_flight(service_url: str) -> None:
    """Requests started before a switch finish on their backend; later ones use the new one; no 5xx."""

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=service_url, timeout=300) as client:
            before = [asyncio.create_task(client.post("/ask", json={"query": f"Apple harvest {i}?"})) for i in range(3)]
            await asyncio.sleep(0.5)
            switches = await asyncio.gather(
                client.post("/switch_model", json={"use_lora": False}),
                client.post("/switch_model", json={"use_lora": False}),
            )
            after = await asyncio.gather(*(client.post("/ask", json={"query": f"Bikes {i}?"}) for i in range(3)))
            back = await client.post("/switch_model", json={"use_lora": True})
            return list(await asyncio.gather(*before)), list(switches) + [back], list(after)

    before, switches, after = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in before + switches + after), [r.text for r in before + after]
    assert [r.json()["model_used"] for r in before] == ["base"] * 3
    assert [r.json()["model_used"] for r in after] == ["ollama"] * 3
    assert switches[0].json() == {
        "using_lora": False, "active_backend": "ollama", "default_adapter": None,  # no adapter here
        "message": switches[0].json()["message"],
    }
    assert switches[-1].json()["using_lora"] is True


def test_health_degraded_when_ollama_is_down_and_a_switch_to_it_refused(tmp_path: Path, corpus_store: Path) -> None:
    settings = make_settings(tmp_path, vector_store_path=corpus_store)  # Ollama URL: nothing listens
    with running_server(create_app(settings)) as url:
        degraded = httpx.get(f"{url}/health", timeout=30)
        switched = httpx.post(f"{url}/switch_model", json={"use_lora": False}, timeout=30)
        after = httpx.get(f"{url}/health", timeout=30)
        still_local = httpx.post(f"{url}/ask", json={"query": "flat tyre fee?", "use_lora": True}, timeout=120)
    assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
    assert switched.status_code == 503 and switched.json()["error"] == "backend_unavailable"
    assert after.status_code == 200 and after.json()["status"] == "degraded"  # nothing changed
    assert still_local.status_code == 200 and still_local.json()["model_used"] == "base"


def test_preload_models_false_loads_on_first_use_and_a_missing_default_adapter_is_not_ready(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    """PRELOAD_MODELS=false: ready without the model, which loads with the first question. DEFAULT_ADAPTER naming
    no adapter: not ready (every default question would be a 503), said in /health, loaded or not."""
    common = {"vector_store_path": corpus_store, "ollama_base_url": ollama.base_url, "preload_models": False}
    app = create_app(make_settings(tmp_path / "lazy", **common))
    with running_server(app) as url:
        models = app.state.rag_service.models
        unloaded = models.loaded("lora")
        ready = httpx.get(f"{url}/health/ready", timeout=30)
        health = httpx.get(f"{url}/health", timeout=30).json()
        answer = httpx.post(f"{url}/ask", json={"query": "How many kilograms does a blue basket hold?"}, timeout=120)
        loaded = models.loaded("lora")
    assert unloaded is None and ready.status_code == 200
    assert health["details"]["components"]["lora_model"] == "not loaded yet (loads on first use)"
    assert answer.status_code == 200 and answer.json()["model_used"] == "base" and loaded is not None

    for preload in (False, True):
        typo = make_settings(tmp_path / f"typo-{preload}", **{**common, "preload_models": preload},
                             default_adapter="nope")
        with running_server(create_app(typo)) as url:
            ready = httpx.get(f"{url}/health/ready", timeout=30)
            health = httpx.get(f"{url}/health", timeout=30).json()
        assert ready.status_code == 503 and health["components"]["lora_model"] is False, preload
        assert "DEFAULT_ADAPTER" in health["details"]["components"]["lora_model"], health
