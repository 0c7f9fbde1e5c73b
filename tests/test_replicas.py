"""Replicas hold no state of their own: with generation remote and the store on Milvus, lora-rag processes started
alike answer alike, whichever one ingested. Everything here is real and on loopback: Milvus Lite run as a server,
a second lora-rag serving SmolLM2 over OpenAI's API as the remote engine, and the replicas as `start_lora_rag.py`
processes."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from tests.conftest import CORPUS, closed_port, make_settings, running_server
from tests.launched import launched_server
from tests.milvus_server import milvus_lite_server
from tests.test_milvus_store import ingest_cli

USER = {"Authorization": "Bearer user-key-replicas"}
ADMIN = {"Authorization": "Bearer admin-key-replicas"}
LIGHTHOUSE = "灯塔管理员每天午夜换班，换班时要检查透镜和燃油。The lighthouse keepers change shift at midnight."
GLACIER = "Glacier tours leave from the north pier at seven; crampons are lent at the harbour office."


def _replica(folder: Path, engine: str, milvus: str) -> AbstractContextManager[str]:
    """A replica in its own folder (an empty VECTOR_STORE_PATH, no documents of its own), ready."""
    return launched_server(folder, {
        "API_KEYS": "user-key-replicas", "ADMIN_API_KEYS": "admin-key-replicas",
        "DEFAULT_BACKEND": "remote", "REMOTE_BASE_URL": f"{engine}/v1",
        "VECTOR_STORE_BACKEND": "milvus", "MILVUS_URI": milvus,
        "VECTOR_STORE_PATH": str(folder / "store"), "SAMPLE_CORPUS_PATH": str(folder / "no-documents"),
        "OLLAMA_BASE_URL": f"http://127.0.0.1:{closed_port()}", "MAX_NEW_TOKENS": "12", "TEMPERATURE": "0",
    })


def _ask(url: str, query: str, **fields: Any) -> dict[str, Any]:
    response = httpx.post(f"{url}/ask", json={"query": query, **fields}, headers=USER, timeout=180)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _cited(url: str, query: str, **fields: Any) -> list[str]:
    return [source["metadata"]["source"] for source in _ask(url, query, **fields)["source_documents"]]


@pytest.mark.slow
def test_two_replicas_on_one_milvus_and_one_remote_engine_serve_what_either_one_ingested(
    tmp_path: Path, corpus_store: Path
) -> None:
    engine_settings = make_settings(tmp_path / "engine", vector_store_path=corpus_store, max_new_tokens=12)
    with ExitStack() as running:
        milvus = running.enter_context(milvus_lite_server(tmp_path / "milvus-data"))
        engine = running.enter_context(running_server(create_app(engine_settings)))
        first = running.enter_context(_replica(tmp_path / "replica-1", engine, milvus))
        second = running.enter_context(_replica(tmp_path / "replica-2", engine, milvus))
        empty = httpx.get(f"{second}/health", headers=ADMIN).json()

        ingested = ingest_cli(tmp_path, milvus, CORPUS)  # into the shared store, while both serve
        assert ingested.returncode == 0, ingested.stderr[-2000:]
        answered = [_ask(url, "How much does a flat tyre repair cost?") for url in (first, second)]

        glacier = httpx.post(f"{first}/documents", files={"file": ("glacier.md", GLACIER.encode())}, headers=ADMIN,
                             timeout=120)
        manual = httpx.post(f"{first}/documents", files={"file": ("灯塔.md", LIGHTHOUSE.encode())},
                            data={"collection": "手册"}, headers=ADMIN, timeout=120)
        glacier_on_second = _cited(second, "When do glacier tours leave?")
        collections_on_second = httpx.get(f"{second}/collections", headers=USER).json()["collections"]
        manual_on_second = _cited(second, "灯塔管理员什么时候换班？", collection="手册")

        deleted = httpx.delete(f"{second}/documents/{glacier.json()['document_id']}", headers=ADMIN, timeout=120)
        glacier_on_first = _cited(first, "When do glacier tours leave?")
        listed_on_first = httpx.get(f"{first}/documents", headers=ADMIN).json()["documents"]

        # A replica started now, in a folder of its own, answers the same: it had nothing to catch up on.
        third = running.enter_context(_replica(tmp_path / "replica-3", engine, milvus))
        manual_on_third = _cited(third, "灯塔管理员什么时候换班？", collection="手册")
        health = httpx.get(f"{third}/health", headers=ADMIN).json()

    # An empty shared store is ready to take documents (the replica is degraded only for Ollama, not running here).
    assert empty["status"] == "degraded" and empty["components"]["ollama_service"] is False, empty
    assert empty["components"]["vector_store"] is True and empty["components"]["remote_service"] is True
    assert empty["details"]["components"]["vector_store"].startswith(f"0 chunks; milvus at {milvus}")
    for body in answered:
        assert body["model_used"] == "remote" and body["answer"].strip()
        assert body["source_documents"][0]["metadata"]["source"] == "corpus/bicycles.txt"
    assert answered[0]["answer"] == answered[1]["answer"]  # greedy, same prompt from the same store
    assert glacier.status_code == 201 and manual.status_code == 201, (glacier.text, manual.text)
    assert glacier_on_second[0] == "glacier.md"
    assert {"name": "手册", "documents": 1, "chunks": 1} in collections_on_second
    assert manual_on_second == ["灯塔.md"]
    assert deleted.status_code == 200, deleted.text
    assert "glacier.md" not in glacier_on_first
    assert sorted(document["source"] for document in listed_on_first) == sorted(
        f"corpus/{name}" for name in ("bicycles.txt", "ferries.html", "orchards.md", "zh/茶园.md")
    ) + ["灯塔.md"]
    assert manual_on_third == ["灯塔.md"]
    assert health["components"]["vector_store"] is True and health["components"]["remote_service"] is True
    assert health["details"]["components"]["vector_store"] == (
        f"4 chunks; 1 more collection; milvus at {milvus} (collection lora_rag_default)"
    )
