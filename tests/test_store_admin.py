"""Vector store administration over HTTP: rebuild, versions, rollback, on a running app (Ollama wire backend)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from app.rag.vector_store import DOCSTORE_FILE
from tests.conftest import CORPUS, make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

USER_KEY = "user-key-store"
ADMIN_KEY = "admin-key-store"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
USER = {"Authorization": f"Bearer {USER_KEY}"}
LIGHTHOUSE = "lighthouse.md"
LIGHTHOUSE_TEXT = "The Skerry lighthouse is painted violet and its lamp turns every nine seconds."
QUESTION = "What colour is the Skerry lighthouse painted?"


@pytest.fixture()
def documents(tmp_path: Path) -> Path:
    """A copy of the fixture corpus (named `corpus/`, as in the store it was ingested into) to change."""
    folder = tmp_path / "docs" / "corpus"
    shutil.copytree(CORPUS, folder)
    return folder


@pytest.fixture()
def app_url(tmp_path: Path, corpus_store: Path, documents: Path, ollama: OllamaWireServer) -> Iterator[str]:
    store = tmp_path / "store"
    shutil.copytree(corpus_store, store)
    settings = make_settings(
        tmp_path, vector_store_path=store, sample_corpus_path=documents, chunk_size=300, chunk_overlap=50,
        use_lora_default=False, ollama_base_url=ollama.base_url, api_keys=USER_KEY, admin_api_keys=ADMIN_KEY,
        rate_limit_per_minute=0,
    )
    with running_server(create_app(settings)) as url:
        yield url


def _sources(client: httpx.Client) -> list[str]:
    response = client.post("/ask", json={"query": QUESTION}, headers=USER)
    assert response.status_code == 200, response.text
    return [doc["metadata"]["source"] for doc in response.json()["source_documents"]]


def test_rebuild_serves_a_new_document_at_once_and_rollback_goes_back(
    app_url: str, documents: Path, ollama: OllamaWireServer
) -> None:
    with httpx.Client(base_url=app_url, timeout=120) as client:
        assert f"corpus/{LIGHTHOUSE}" not in _sources(client)
        (documents / LIGHTHOUSE).write_text(LIGHTHOUSE_TEXT, encoding="utf-8")
        refused = client.post("/admin/vector-store/rebuild", headers=USER)
        rebuilt = client.post("/admin/vector-store/rebuild", headers=ADMIN)  # no body: incremental
        after_rebuild = _sources(client)
        prompt = ollama.bodies("/api/chat")[-1]["messages"][0]["content"]
        versions = client.get("/admin/vector-store/versions", headers=ADMIN).json()
        rolled = client.post("/admin/vector-store/rollback", json={"version": "v000001"}, headers=ADMIN)
        after_rollback = _sources(client)
        versions_after = client.get("/admin/vector-store/versions", headers=ADMIN).json()

    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert rebuilt.status_code == 200, rebuilt.text
    report = rebuilt.json()
    assert report["version"] == "v000002"
    assert (report["added"], report["updated"], report["removed"], report["unchanged"]) == (1, 0, 0, 4)
    assert report["chunks_embedded"] == 1 and report["failed"] == {} and report["seconds"] >= 0
    assert after_rebuild[0] == f"corpus/{LIGHTHOUSE}"
    assert "painted violet" in prompt  # the new passage reached the model

    assert versions["current"] == versions["serving"] == "v000002"
    assert [(v["version"], v["live"]) for v in versions["versions"]] == [("v000001", False), ("v000002", True)]
    assert versions["versions"][1]["chunk_count"] == report["chunk_count"]

    assert rolled.status_code == 200, rolled.text
    assert rolled.json() == {"version": "v000001", "previous": "v000002",
                             "chunk_count": versions["versions"][0]["chunk_count"]}
    assert f"corpus/{LIGHTHOUSE}" not in after_rollback
    assert versions_after["current"] == versions_after["serving"] == "v000001"


def test_concurrent_rebuilds_one_runs_the_other_gets_409_and_questions_are_answered(
    app_url: str, documents: Path
) -> None:
    for number in range(24):  # enough text that re-embedding everything takes a few seconds
        (documents / f"note{number:02d}.txt").write_text(f"Note {number}. " + "Tides and ferries. " * 120)

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=app_url, timeout=300) as client:
            rebuilds = [
                asyncio.create_task(client.post("/admin/vector-store/rebuild", json={"rebuild": True}, headers=ADMIN))
                for _ in range(2)
            ]
            await asyncio.sleep(0.2)
            question = await client.post("/ask", json={"query": QUESTION}, headers=USER)
            return list(await asyncio.gather(*rebuilds)), question

    rebuilds, question = asyncio.run(scenario())
    assert sorted(r.status_code for r in rebuilds) == [200, 409], [r.text for r in rebuilds]
    conflict = next(r for r in rebuilds if r.status_code == 409).json()
    assert conflict["error"] == "conflict" and "another ingestion" in conflict["message"]
    done = next(r for r in rebuilds if r.status_code == 200).json()
    assert done["added"] == 28 and done["unchanged"] == 0 and done["chunks_embedded"] == done["chunk_count"]
    assert question.status_code == 200  # served from the previous version meanwhile


def test_rollback_refuses_unknown_malformed_and_tampered_versions_and_keeps_serving(
    app_url: str, documents: Path, tmp_path: Path
) -> None:
    (documents / LIGHTHOUSE).write_text(LIGHTHOUSE_TEXT, encoding="utf-8")
    with httpx.Client(base_url=app_url, timeout=120, headers=ADMIN) as client:
        assert client.post("/admin/vector-store/rebuild", json={"rebuild": False}).status_code == 200
        docstore = tmp_path / "store" / "v000001" / DOCSTORE_FILE
        docstore.write_text(docstore.read_text(encoding="utf-8").replace("eighteen", "eighty"), encoding="utf-8")
        tampered = client.post("/admin/vector-store/rollback", json={"version": "v000001"})
        unknown = client.post("/admin/vector-store/rollback", json={"version": "v000009"})
        malformed = client.post("/admin/vector-store/rollback", json={"version": "../v000001"})
        missing = client.post("/admin/vector-store/rollback", json={})
        versions = client.get("/admin/vector-store/versions").json()
        sources = _sources(client)

    assert tampered.status_code == 409 and tampered.json()["error"] == "invalid_store_version"
    assert "v000001" in tampered.json()["message"] and "checksum" in tampered.json()["message"]
    assert unknown.status_code == 404 and "v000001, v000002" in unknown.json()["message"]
    assert malformed.status_code == 422 and missing.status_code == 422
    assert versions["current"] == versions["serving"] == "v000002"
    assert sources[0] == f"corpus/{LIGHTHOUSE}"
