"""Many adapters on one base model, chosen per request, on the real model over real HTTP."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.llm.model_source import resolve_base_model
from app.main import create_app
from tests.adapter_training import train_word_adapter
from tests.conftest import make_settings, running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two adapters really trained to answer differently: `alpha` says ALPHA, `bravo` says BRAVO."""
    folder = tmp_path_factory.mktemp("adapters")
    base = resolve_base_model("embedded:SmolLM2-135M-Instruct", None)
    train_word_adapter(base, "ALPHA", folder / "alpha")
    train_word_adapter(base, "BRAVO", folder / "bravo")
    return folder


def _server(tmp_path: Path, corpus_store: Path, adapters_dir: Path, **overrides: object):  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, vector_store_path=corpus_store, lora_adapters_dir=adapters_dir,
                             max_new_tokens=6, **overrides)
    return running_server(create_app(settings))


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, corpus_store: Path, adapters_dir: Path) -> Iterator[str]:
    with _server(tmp_path_factory.mktemp("srv"), corpus_store, adapters_dir) as base_url:
        yield base_url


def _ask(client: httpx.Client, **body: object) -> httpx.Response:
    return client.post("/ask", json={"query": "What is the capital of France?", **body})


def test_interleaved_concurrent_requests_never_see_another_adapter(url: str) -> None:
    choices = [{"adapter": "alpha"}, {"adapter": "bravo"}, {"adapter": None}, {"adapter_id": "bravo"},
               {"lora_adapter_ids": ["alpha"]}] * 4

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(
                *(client.post("/ask", json={"query": f"Question number {i}: what is it?", **choice})
                  for i, choice in enumerate(choices))
            )

    for choice, response in zip(choices, asyncio.run(run()), strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        wanted = {"alpha": "ALPHA", "bravo": "BRAVO"}.get(next(iter(choice.values())) if not isinstance(
            next(iter(choice.values())), list) else "alpha")
        if wanted is None:
            assert body["model_used"] == "base" and "ALPHA" not in body["answer"] and "BRAVO" not in body["answer"]
        else:
            other = "BRAVO" if wanted == "ALPHA" else "ALPHA"
            assert body["model_used"] == "lora" and wanted in body["answer"] and other not in body["answer"], body


def test_unknown_adapter_is_404_listing_the_loaded_ones(url: str) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        response = _ask(client, adapter="charlie")
    assert response.status_code == 404
    assert response.json()["error"] == "adapter_not_found"
    assert "alpha" in response.json()["message"] and "bravo" in response.json()["message"]


def test_weighted_mix_is_built_once_and_cached(url: str) -> None:
    mix = [{"name": "alpha", "weight": 1.0}, {"name": "bravo", "weight": 0.25}]
    with httpx.Client(base_url=url, timeout=120) as client:
        first, second = _ask(client, adapters=mix), _ask(client, adapters=list(reversed(mix)))
        catalogue = client.get("/admin/adapters").json()
    assert first.status_code == second.status_code == 200
    assert first.json()["adapters"] == second.json()["adapters"] == "alpha*1+bravo*0.25"
    assert "ALPHA" in first.json()["answer"]  # alpha dominates this mix
    assert catalogue["mixes"] == ["alpha*1+bravo*0.25"]
    served = {entry["name"]: entry["requests_served"] for entry in catalogue["adapters"]}
    assert served["alpha"] >= 2 and served["bravo"] >= 2


def test_conflicting_adapter_fields_and_duplicates_are_422(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        both = _ask(client, adapter="alpha", adapter_id="bravo")
        twice = _ask(client, adapters=[{"name": "alpha"}, {"name": "alpha"}])
        on_ollama = _ask(client, adapter="alpha", use_lora=False)
    assert both.status_code == 422 and "only one of" in both.json()["message"]
    assert twice.status_code == 422
    assert on_ollama.status_code == 400 and "local model only" in on_ollama.json()["message"]


def test_load_during_traffic_and_unload_in_use(url: str, adapters_dir: Path) -> None:
    shutil.copytree(adapters_dir / "alpha", adapters_dir / "charlie-src")

    async def run() -> tuple[list[httpx.Response], httpx.Response, httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            traffic = [asyncio.ensure_future(client.post("/ask", json={"query": f"Q{i}?", "adapter": "bravo"}))
                       for i in range(6)]
            await asyncio.sleep(0.2)
            load = await client.post(
                "/admin/load-lora-adapter", json={"lora_name": "charlie", "lora_path": "charlie-src"}
            )
            unload = await client.post("/admin/unload-lora-adapter", json={"lora_name": "bravo"})
            done = await asyncio.gather(*traffic)
            after = await client.post("/ask", json={"query": "Q?", "adapter": "bravo"})
            charlie = await client.post("/ask", json={"query": "Q?", "adapter": "charlie"})
            return done, load, unload, after, charlie

    done, load, unload, after, charlie = asyncio.run(run())
    assert load.status_code == 200 and load.json()["status"] == "loaded" and load.json()["rank"] == 8
    assert unload.status_code == 200
    assert [r.status_code for r in done] == [200] * 6
    assert all("BRAVO" in r.json()["answer"] for r in done)  # in flight or queued before the unload
    assert after.status_code == 404
    assert charlie.status_code == 200 and "ALPHA" in charlie.json()["answer"]
    with httpx.Client(base_url=url, timeout=60) as client:
        again = client.post("/admin/load-lora-adapter", json={"lora_name": "charlie", "lora_path": "charlie-src"})
        restore = client.post("/v1/load_lora_adapter", json={"lora_name": "bravo", "lora_path": "bravo"})
    assert again.status_code == 200  # idempotent for the same path
    assert restore.status_code == 200 and restore.text.startswith("Success")


def test_vllm_routes_status_codes(url: str, adapters_dir: Path) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        duplicate = client.post("/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": "bravo"})
        unknown = client.post("/v1/unload_lora_adapter", json={"lora_name": "zulu"})
        missing = client.post("/v1/load_lora_adapter", json={"lora_name": "zulu", "lora_path": "no-such-folder"})
    assert duplicate.status_code == 400 and "already loaded" in duplicate.json()["error"]["message"]
    assert unknown.status_code == 404
    assert missing.status_code == 400


def test_adapter_paths_outside_the_root_are_refused_before_reading(
    url: str, adapters_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(adapters_dir / "alpha", outside)
    os.symlink(outside, adapters_dir / "sneaky")
    attempts = ["../outside", str(outside), "http://example.com/adapter", "sneaky", "alpha/../../outside", "%2e%2e/x"]
    with httpx.Client(base_url=url, timeout=60) as client:
        for path in attempts:
            response = client.post("/admin/load-lora-adapter", json={"lora_name": "evil", "lora_path": path})
            assert response.status_code == 400, (path, response.text)
            assert str(tmp_path) not in response.text
        names = [entry["name"] for entry in client.get("/admin/adapters").json()["adapters"]]
    assert "evil" not in names


def test_lru_unloads_and_reloads_on_demand(tmp_path: Path, corpus_store: Path, adapters_dir: Path) -> None:
    with _server(tmp_path, corpus_store, adapters_dir, max_loaded_adapters=1) as base_url, \
            httpx.Client(base_url=base_url, timeout=120) as client:
        answers = [_ask(client, adapter=name).json()["answer"] for name in ("alpha", "bravo", "alpha", "bravo")]
        statuses = {e["name"]: e["status"] for e in client.get("/admin/adapters").json()["adapters"]}
    assert ["ALPHA" in a for a in answers] == [True, False, True, False]
    assert ["BRAVO" in a for a in answers] == [False, True, False, True]
    assert sorted(statuses.values()).count("loaded") == 1


def test_switch_model_switches_the_lora_model_at_run_time(
    tmp_path: Path, corpus_store: Path, adapters_dir: Path
) -> None:
    """The design card's FAQ: "runtime switch: use the /switch_model API". Two adapters and no default (the base
    model answers); `{"adapter": "bravo"}`, then `{"lora_model_path": <another folder>}`; /model_info agrees; a
    name or folder that cannot serve changes nothing."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(adapters_dir / "alpha", elsewhere / "alpha-v2")
    with _server(tmp_path / "srv", corpus_store, adapters_dir, adapter_allowed_roots=str(elsewhere)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        before = _ask(client).json()
        to_bravo = client.post("/switch_model", json={"adapter": "bravo"})
        on_bravo, info_bravo = _ask(client).json(), client.get("/model_info").json()
        unknown = client.post("/switch_model", json={"adapter": "nope"})
        outside = client.post("/switch_model", json={"lora_model_path": str(tmp_path / "srv")})
        both = client.post("/switch_model", json={"adapter": "bravo", "backend": "ollama"})
        still_bravo = _ask(client).json()
        to_folder = client.post("/switch_model", json={"lora_model_path": str(elsewhere / "alpha-v2")})
        on_folder, info_folder = _ask(client).json(), client.get("/model_info").json()
        named = _ask(client, adapter="bravo").json()
    assert before["model_used"] == "base" and "BRAVO" not in before["answer"]
    assert to_bravo.status_code == 200 and to_bravo.json()["default_adapter"] == "bravo", to_bravo.text
    assert "BRAVO" in on_bravo["answer"] and on_bravo["model_used"] == "lora"
    assert info_bravo["default_adapter"] == "bravo" and info_bravo["using_lora"] is True
    assert info_bravo["lora_model_path"].endswith("bravo") and info_bravo["lora_exists"] is True
    assert unknown.status_code == 404 and "nope" in unknown.json()["message"]
    assert outside.status_code == 400 and both.status_code == 422
    assert "BRAVO" in still_bravo["answer"]
    assert to_folder.status_code == 200 and to_folder.json()["default_adapter"] == "alpha-v2", to_folder.text
    assert "ALPHA" in on_folder["answer"] and info_folder["default_adapter"] == "alpha-v2"
    assert info_folder["lora_model_path"] == str((elsewhere / "alpha-v2").resolve())
    assert "BRAVO" in named["answer"]  # a request naming its adapter still gets it
