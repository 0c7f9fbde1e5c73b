"""GET /metrics after real traffic on a real server, parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from tests.conftest import make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer
from tests.test_multi_adapter import adapters_dir  # noqa: F401  (the module-scoped fixture with alpha and bravo)

USER_KEY = "user-SENTINEL-4d2b"
ADMIN_KEY = "admin-SENTINEL-8e61"
QUERY = "When does the first ferry leave? QUESTION-SENTINEL-5c3a"


@contextmanager
def _ollama_server(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer, **overrides: object) -> Iterator[str]:
    settings = make_settings(tmp_path, vector_store_path=corpus_store, use_lora_default=False,
                             ollama_base_url=ollama.base_url, api_keys=USER_KEY, admin_api_keys=ADMIN_KEY, **overrides)
    with running_server(create_app(settings)) as url:
        yield url


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _families(text: str) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict[str, Metric], family: str, sample: str | None = None, **labels: str) -> float:
    """The sum of `family`'s samples named `sample` (default: the family's name) whose labels include `labels`."""
    wanted = sample or family
    return sum(s.value for s in families[family].samples
               if s.name == wanted and labels.items() <= s.labels.items())


def _scrape(client: httpx.Client) -> dict[str, Metric]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return _families(response.text)


def test_metrics_after_traffic_show_every_family_and_no_secret(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    ollama.token_delay = 0.1  # a streamed answer takes a while, so the queue can be seen busy
    with _ollama_server(tmp_path, corpus_store, ollama, max_concurrent_generations=1) as url, \
            httpx.Client(base_url=url, timeout=60, headers=_auth(USER_KEY)) as client, \
            ThreadPoolExecutor(1) as pool:
        plain = client.post("/ask", json={"query": QUERY})
        assert plain.status_code == 200, plain.text
        with client.stream("POST", "/ask", json={"query": QUERY, "stream": True}) as streamed:
            lines = streamed.iter_lines()
            assert next(lines).startswith("event: delta")
            queued = pool.submit(client.post, "/ask", json={"query": QUERY})
            deadline = time.monotonic() + 30
            while (busy := _scrape(client)) and _value(busy, "vllm:num_requests_waiting") < 1:
                assert time.monotonic() < deadline, "the second /ask never showed as waiting"
                time.sleep(0.02)
            done = json.loads([line for line in lines if line.startswith("data:")][-1].removeprefix("data: "))
        assert queued.result().status_code == 200
        assert client.get("/no/such/path-SENTINEL").status_code == 404
        assert client.post("/ask", json={"query": ""}).status_code == 422
        assert httpx.post(f"{url}/ask", json={"query": QUERY}, headers=_auth("wrong-SENTINEL")).status_code == 401
        anonymous = httpx.get(f"{url}/metrics", timeout=30)  # open by default, for scrapers without keys
    assert anonymous.status_code == 200
    families = _families(anonymous.text)

    # The queue while the stream ran: one generating, the next waiting for its place (vLLM's names and ours).
    assert _value(busy, "vllm:num_requests_running", model_name="SmolLM2-135M-Instruct") == 1
    assert _value(busy, "lora_rag_generations_running") == 1 and _value(busy, "lora_rag_generations_waiting") == 1
    assert _value(families, "vllm:num_requests_running") == 0 and _value(families, "vllm:num_requests_waiting") == 0

    requests = "lora_rag_http_requests"
    assert _value(families, requests, f"{requests}_total", method="POST", route="/ask", status="200") == 3
    assert _value(families, requests, f"{requests}_total", method="POST", route="/ask", status="422") == 1
    assert _value(families, requests, f"{requests}_total", method="GET", route="unmatched", status="404") == 1
    assert _value(families, requests, f"{requests}_total", method="POST", route="unmatched", status="401") == 1
    assert _value(families, requests, f"{requests}_total", route="/metrics", status="200") >= 2
    latency = "lora_rag_http_request_duration_seconds"
    assert _value(families, latency, f"{latency}_count", method="POST", route="/ask") == 4
    assert _value(families, latency, f"{latency}_sum", method="POST", route="/ask") > 0
    first_token = "lora_rag_time_to_first_token_seconds"
    assert _value(families, first_token, f"{first_token}_count", route="/ask") == 1  # the one streamed answer
    assert 0 < _value(families, first_token, f"{first_token}_sum") < _value(families, latency, f"{latency}_sum")
    retrieval = "lora_rag_retrieval_duration_seconds"
    assert _value(families, retrieval, f"{retrieval}_count") == 3
    assert _value(families, retrieval, f"{retrieval}_sum") > 0
    # The design card's names: three RAG questions answered, timed from retrieval to the end of the answer.
    assert _value(families, "rag_requests", "rag_requests_total") == 3
    rag_seconds = "rag_response_time_seconds"
    assert _value(families, rag_seconds, f"{rag_seconds}_count") == 3
    assert _value(families, retrieval, f"{retrieval}_sum") < _value(families, rag_seconds, f"{rag_seconds}_sum")

    usage = plain.json()["usage"]
    assert done["usage"] == usage and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert _value(families, "lora_rag_prompt_tokens", "lora_rag_prompt_tokens_total",
                  model_used="ollama") == 3 * usage["prompt_tokens"]
    assert _value(families, "lora_rag_generation_tokens", "lora_rag_generation_tokens_total",
                  model_used="ollama") == 3 * usage["completion_tokens"]
    assert _value(families, "lora_rag_generations", "lora_rag_generations_total", model_used="ollama") == 3

    [info] = families["vllm:lora_requests_info"].samples
    assert info.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "8"}
    assert abs(info.value - time.time()) < 60  # a timestamp, as vLLM's
    # The local model was never loaded: its adapter families are there, empty, and the scrape did not load it.
    assert families["lora_rag_adapter_requests"].samples == [] and families["lora_rag_adapter_loaded"].samples == []
    assert "lora_rag_adapter_changes" in families

    for secret in ("SENTINEL", "first ferry", "Skerry", "06:40", USER_KEY, ADMIN_KEY):
        assert secret not in anonymous.text


def test_metrics_can_require_a_key_or_be_off(tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer) -> None:
    with _ollama_server(tmp_path / "keyed", corpus_store, ollama, metrics_require_key=True) as url:
        anonymous = httpx.get(f"{url}/metrics", timeout=30)
        as_user = httpx.get(f"{url}/metrics", headers=_auth(USER_KEY), timeout=30)
    assert anonymous.status_code == 401 and as_user.status_code == 200
    assert "lora_rag_http_requests_total" in as_user.text
    with _ollama_server(tmp_path / "off", corpus_store, ollama, metrics_enabled=False) as url:
        off = httpx.get(f"{url}/metrics", headers=_auth(ADMIN_KEY), timeout=30)
    assert off.status_code == 404


@pytest.mark.slow
def test_adapter_families_name_the_adapters_on_the_real_model(
    tmp_path: Path, corpus_store: Path, adapters_dir: Path  # noqa: F811
) -> None:
    settings = make_settings(tmp_path, vector_store_path=corpus_store, max_new_tokens=48, max_concurrent_generations=1,
                             lora_adapters_dir=tmp_path / "empty", adapter_allowed_roots=str(adapters_dir),
                             max_loaded_adapters=3)
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=300) as client, \
            ThreadPoolExecutor(3) as pool:
        loaded = client.post("/v1/load_lora_adapter",
                             json={"lora_name": "alpha", "lora_path": str(adapters_dir / "alpha")})
        assert loaded.status_code == 200, loaded.text
        on_base = pool.submit(client.post, "/ask", json={"query": "Tell me all about ferries.", "adapter": None})
        while _value(_scrape(client), "lora_rag_generations_running") < 1:
            assert not on_base.done(), on_base.result().text
            time.sleep(0.02)
        on_alpha = pool.submit(client.post, "/ask", json={"query": QUERY, "adapter": "alpha"})
        # A name typed by a user that no adapter has: never a label value (it could be anything, a secret too).
        typed = pool.submit(client.post, "/ask", json={"query": QUERY, "adapter": "my-password-is-SENTINEL"})
        while _value(busy := _scrape(client), "vllm:num_requests_waiting") < 2:
            assert not on_alpha.done(), "the request on alpha never showed as waiting"
            time.sleep(0.02)
        assert on_base.result().status_code == 200 and on_alpha.result().status_code == 200
        assert typed.result().status_code == 404
        with client.stream("POST", "/v1/chat/completions", json={
            "model": "alpha", "stream": True, "messages": [{"role": "user", "content": QUERY}],
        }) as streamed:
            assert streamed.status_code == 200 and streamed.read()
        families = _scrape(client)

    [info] = busy["vllm:lora_requests_info"].samples
    assert info.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "alpha", "max_lora": "3"}
    assert _value(busy, "vllm:num_requests_running") == 1 and _value(busy, "vllm:num_requests_waiting") == 2
    assert _value(families, "lora_rag_adapter_requests", "lora_rag_adapter_requests_total", adapter="alpha") == 2
    assert _value(families, "lora_rag_adapter_loaded", adapter="alpha") == 1
    assert _value(families, "lora_rag_adapter_evictions", "lora_rag_adapter_evictions_total", adapter="alpha") == 0
    assert _value(families, "lora_rag_adapter_changes", "lora_rag_adapter_changes_total", change="load") == 1
    first_token = "lora_rag_time_to_first_token_seconds"
    assert _value(families, first_token, f"{first_token}_count", route="/v1/chat/completions") == 1
    for model_used in ("lora", "base"):
        assert _value(families, "lora_rag_generation_tokens", "lora_rag_generation_tokens_total",
                      model_used=model_used) > 0
    [info] = families["vllm:lora_requests_info"].samples
    assert info.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "3"}


def test_an_unexpected_error_is_a_500_counted_under_its_route(
    tmp_path: Path, corpus_store: Path, ollama: OllamaWireServer
) -> None:
    """A bug in a route (here one added to the real app that raises) is answered by the server's last resort, outside
    every middleware; it is still counted under the route's template, not `unmatched`."""
    settings = make_settings(tmp_path, vector_store_path=corpus_store, use_lora_default=False,
                             ollama_base_url=ollama.base_url)
    app = create_app(settings)

    async def broken(item: str) -> None:
        raise RuntimeError(f"BUG-SENTINEL {item}")

    app.add_api_route("/broken/{item}", broken)
    with running_server(app) as url:
        answer = httpx.get(f"{url}/broken/one", timeout=30)
        families = _families(httpx.get(f"{url}/metrics", timeout=30).text)
    assert answer.status_code == 500 and "BUG-SENTINEL" not in answer.text
    requests = "lora_rag_http_requests"
    assert _value(families, requests, f"{requests}_total", method="GET", route="/broken/{item}", status="500") == 1
    assert _value(families, requests, f"{requests}_total", route="unmatched") == 0
