"""VECTOR_STORE_BACKEND=milvus on real Milvus: the embedded Milvus Lite of the milvus-lite package (MILVUS_URI a
local path), and Milvus Lite run as a server on loopback for what a cluster URI does."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.rag.embeddings import Embedder
from app.rag.ingestion import add_document, ingest_folder
from app.rag.retrieval.registry import RETRIEVERS
from app.rag.stores.milvus_store import MilvusBackend, milvus_collection_name, pymilvus
from bench.retrieval_quality import CORPUS as QUALITY_CORPUS
from bench.retrieval_quality import collections_of, quality, questions
from tests.conftest import CORPUS, REPO_ROOT, closed_port, make_settings, running_server
from tests.launched import launched_server
from tests.milvus_server import milvus_lite_server
from tests.ollama_wire_server import OllamaWireServer

USER_KEY = "user-key-milvus"
ADMIN_KEY = "admin-key-milvus"
USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TOKEN = "root:secret-milvus-token"

TYRE = "How much does a flat tyre repair cost?"
TEA = "茶园什么时候采摘春茶？"
GLACIER = "Glacier tours leave from the north pier at seven; crampons are lent at the harbour office."


def ingest_cli(cwd: Path, uri: str, source: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`scripts/ingest.py` in its own process, on the Milvus at `uri`."""
    env = {**os.environ, "VECTOR_STORE_BACKEND": "milvus", "MILVUS_URI": uri}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "ingest.py"), "--source", str(source), "--quiet", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


@contextmanager
def _client(tmp_path: Path, uri: str, ollama: OllamaWireServer, **overrides: Any) -> Iterator[httpx.Client]:
    values: dict[str, Any] = {"vector_store_backend": "milvus", "milvus_uri": uri, "use_lora_default": False,
                              "ollama_base_url": ollama.base_url, "api_keys": USER_KEY, "admin_api_keys": ADMIN_KEY}
    app = create_app(make_settings(tmp_path, **{**values, **overrides}))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def _cited(client: httpx.Client, query: str, **fields: Any) -> list[str]:
    response = client.post("/ask", json={"query": query, **fields}, headers=USER)
    assert response.status_code == 200, response.text
    return [source["metadata"]["source"] for source in response.json()["source_documents"]]


def _upload(client: httpx.Client, name: str, text: str, collection: str | None = None) -> httpx.Response:
    form = {"collection": collection} if collection is not None else None
    return client.post("/documents", files={"file": (name, text.encode())}, data=form, headers=ADMIN)


@pytest.mark.slow
def test_scripts_ingest_and_ask_work_on_milvus_lite_and_health_names_it(
    tmp_path: Path, ollama: OllamaWireServer
) -> None:
    uri = str(tmp_path / "milvus.db")
    ingested = ingest_cli(tmp_path, uri, CORPUS)
    assert ingested.returncode == 0, ingested.stderr[-2000:]
    assert f"at {uri} (collection lora_rag_default): 4 chunks (4 files added" in ingested.stdout
    again = ingest_cli(tmp_path, uri, CORPUS)
    assert "0 files added, 0 updated, 4 unchanged, 0 removed; 0 chunks embedded" in again.stdout, again.stdout

    with _client(tmp_path, uri, ollama) as client:
        health = client.get("/health", headers=ADMIN).json()
        info = client.get("/model_info", headers=ADMIN).json()
        tyre, tea = _cited(client, TYRE), _cited(client, TEA)
        versions = client.get("/admin/vector-store/versions", headers=ADMIN)
        # The server holds the Milvus Lite folder: a second process cannot open it, and is told what to do.
        blocked = ingest_cli(tmp_path, uri, CORPUS)
        still = _cited(client, TYRE)

    assert health["status"] == "healthy" and health["components"]["vector_store"] is True
    assert health["details"]["components"]["vector_store"] == f"4 chunks; milvus at {uri} (collection lora_rag_default)"
    assert info["vector_store_backend"] == "milvus" and info["vector_store_location"] == uri
    assert tyre[0] == "corpus/bicycles.txt"
    assert tea[0] == "corpus/zh/茶园.md"  # Milvus's BM25 with the jieba analyser finds Chinese words
    assert versions.status_code == 501 and "keeps no versions" in versions.json()["message"]
    assert blocked.returncode != 0 and "is open in another process" in blocked.stderr
    assert "POST /documents" in blocked.stderr and "Traceback" not in blocked.stderr
    assert still == tyre


@pytest.mark.slow
def test_ingestion_on_milvus_is_incremental_by_content_hash_and_a_rebuild_keeps_uploaded_documents(
    tmp_path: Path, embedder: Embedder
) -> None:
    source = tmp_path / "handbook"
    source.mkdir()
    (source / "bikes.md").write_text("Bicycle rental costs eight euros a day; helmets are free.", encoding="utf-8")
    (source / "boats.md").write_text("The ferry to the island leaves hourly from pier two.", encoding="utf-8")
    (source / "tea.md").write_text("茶园每年清明节前采摘春茶，游客周三可以参观。", encoding="utf-8")
    backend = MilvusBackend(embedder, str(tmp_path / "milvus.db"), "", 30.0)
    store = backend.collection("default")

    def ingest(**options: Any) -> Any:
        return ingest_folder(source, store, chunk_size=300, chunk_overlap=50, show_progress=False, **options)

    first = ingest()
    (source / "boats.md").write_text("The ferry to the island now leaves every two hours.", encoding="utf-8")
    (source / "tea.md").unlink()
    second = ingest()
    view = store.read()
    assert view is not None
    after_change, size_after_change = {name: entry.sha256 for name, entry in view.files.items()}, view.size
    ferry = [hit.chunk.text for hit in view.search(embedder.embed(["When does the ferry leave?"])[0], 3)]
    tea_words = view.search_lexical("春茶 参观", 3)

    add_document(store, "uploaded.md", GLACIER, "9" * 64, chunk_size=300, chunk_overlap=50)
    rebuilt = ingest(rebuild=True)
    final = store.read()
    assert final is not None

    assert (first.added, first.chunks_embedded, first.chunk_count) == (["handbook/bikes.md", "handbook/boats.md",
                                                                        "handbook/tea.md"], 3, 3)
    assert second.updated == ["handbook/boats.md"] and second.removed == ["handbook/tea.md"]
    assert second.unchanged == ["handbook/bikes.md"] and second.chunks_embedded == 1 and second.chunk_count == 2
    assert sorted(after_change) == ["handbook/bikes.md", "handbook/boats.md"] and size_after_change == 2
    assert "every two hours" in ferry[0] and all("hourly" not in text for text in ferry)  # the old rows are gone
    assert tea_words == []  # nothing of the removed document is found any more
    assert rebuilt.other_sources == {"uploads"} and rebuilt.chunks_embedded == 3
    assert sorted(final.files) == ["handbook/bikes.md", "handbook/boats.md", "uploaded.md"] and final.size == 3
    assert backend.collection_names() == ["default"]


@pytest.mark.slow
def test_the_documents_api_and_collections_work_on_milvus(tmp_path: Path, ollama: OllamaWireServer) -> None:
    with _client(tmp_path, str(tmp_path / "milvus.db"), ollama) as client:
        added = _upload(client, "glacier.md", GLACIER)
        same = _upload(client, "glacier.md", GLACIER)
        found = _cited(client, "When do glacier tours leave?")
        manual = _upload(client, "灯塔.md", "灯塔管理员每天午夜换班，换班时要检查透镜和燃油。", collection="手册")
        collections = client.get("/collections", headers=USER).json()
        in_manual = _cited(client, "灯塔管理员什么时候换班？", collection="手册")
        listed = client.get("/documents", headers=ADMIN).json()
        deleted = client.delete(f"/documents/{added.json()['document_id']}", headers=ADMIN)
        after = _cited(client, "When do glacier tours leave?")
        gone = client.delete(f"/documents/{added.json()['document_id']}", headers=ADMIN)

    assert added.status_code == 201 and same.status_code == 200, (added.text, same.text)
    assert same.json()["document_id"] == added.json()["document_id"]
    assert found[0] == "glacier.md"
    assert manual.status_code == 201, manual.text
    assert {"name": "手册", "documents": 1, "chunks": 1} in collections["collections"]
    assert in_manual == ["灯塔.md"]  # only that collection's chunks
    assert sorted((d["collection"], d["source"]) for d in listed["documents"]) == [("default", "glacier.md"),
                                                                                   ("手册", "灯塔.md")]
    assert deleted.status_code == 200 and "glacier.md" not in after and gone.status_code == 404
    assert milvus_collection_name("手册").startswith("lora_rag_") and milvus_collection_name("docs") == "lora_rag_docs"


@pytest.mark.slow
def test_an_unreachable_milvus_is_a_503_naming_its_uri_and_never_its_token(
    tmp_path: Path, ollama: OllamaWireServer
) -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    with _client(tmp_path, down, ollama, milvus_token=TOKEN, milvus_timeout=3) as client:
        health = client.get("/health", headers=ADMIN)
        ready = client.get("/health/ready")
        asked = client.post("/ask", json={"query": TYRE}, headers=USER)
        listed = client.get("/documents", headers=ADMIN)
    assert health.status_code == 503 and health.json()["components"]["vector_store"] is False
    assert down in health.json()["details"]["components"]["vector_store"]
    assert ready.status_code == 503
    assert asked.status_code == 503, asked.text
    assert asked.json()["error"] == "vector_store_unavailable" and down in asked.json()["message"]
    assert listed.status_code == 503 and down in listed.json()["message"]  # not an empty list: nothing is known
    for response in (health, asked, listed):
        assert "secret-milvus-token" not in response.text and "Traceback" not in response.text


@pytest.mark.slow
def test_a_milvus_server_uri_serves_what_the_cli_ingested_and_comes_back_after_a_restart(
    tmp_path: Path, ollama: OllamaWireServer
) -> None:
    data = tmp_path / "milvus-data"
    with milvus_lite_server(data) as uri:
        ingested = ingest_cli(tmp_path, uri, CORPUS)
        assert ingested.returncode == 0, ingested.stderr[-2000:]
        with _client(tmp_path, uri, ollama) as client:
            before = _cited(client, TEA)
    with milvus_lite_server(data) as uri, _client(tmp_path, uri, ollama) as client:  # the server restarted
        after = _cited(client, TEA)
        health = client.get("/health", headers=ADMIN).json()
    assert before[0] == after[0] == "corpus/zh/茶园.md"
    assert health["status"] == "healthy" and f"milvus at {uri}" in health["details"]["components"]["vector_store"]


@pytest.mark.slow
def test_hybrid_retrieval_on_milvus_finds_chinese_and_english_questions_as_on_faiss(
    tmp_path: Path, float32_embedder: Embedder
) -> None:
    settings = make_settings(tmp_path)
    found = {}
    for language in ("en", "zh"):
        collections = collections_of(QUALITY_CORPUS / language, float32_embedder, tmp_path / language, "milvus")
        found[language] = {mode: quality(RETRIEVERS[mode](settings, collections), questions(language))
                           for mode in ("dense", "hybrid")}
    print({language: {mode: q.recall_at_1 for mode, q in modes.items()} for language, modes in found.items()})
    # Questions phrased unlike the text (bench/data): Milvus's BM25 (jieba analyser) carries the Chinese ones,
    # where the English-only embedder alone ranks few first; in English hybrid loses nothing against dense.
    assert found["zh"]["hybrid"].recall_at_1 >= 0.8, found["zh"]["hybrid"].misses_at_1
    assert found["zh"]["hybrid"].recall_at_4 == 1.0
    assert found["en"]["hybrid"].recall_at_1 >= found["en"]["dense"].recall_at_1, found["en"]["hybrid"].misses_at_1


@pytest.mark.slow
def test_the_launcher_on_milvus_lite_builds_the_first_store_then_serves_and_takes_uploads_in_one_process(
    tmp_path: Path, ollama: OllamaWireServer
) -> None:
    uri = str(tmp_path / "server" / "milvus.db")
    env = {"VECTOR_STORE_BACKEND": "milvus", "MILVUS_URI": uri, "SAMPLE_CORPUS_PATH": str(CORPUS),
           "USE_LORA_DEFAULT": "false", "OLLAMA_BASE_URL": ollama.base_url, "API_KEYS": USER_KEY,
           "ADMIN_API_KEYS": ADMIN_KEY}
    with launched_server(tmp_path / "server", env) as url, httpx.Client(base_url=url, timeout=120) as client:
        health = client.get("/health", headers=ADMIN).json()
        cited = _cited(client, TYRE)
        uploaded = _upload(client, "glacier.md", GLACIER)
        found = _cited(client, "When do glacier tours leave?")
    # The launcher opened Milvus Lite to build the store from SAMPLE_CORPUS_PATH, the server opened it again in the
    # same process: its own lock is not another process's.
    assert health["components"]["vector_store"] is True, health
    assert health["details"]["components"]["vector_store"].startswith("4 chunks; milvus at")
    assert cited[0] == "corpus/bicycles.txt"
    assert uploaded.status_code == 201, uploaded.text
    assert found[0] == "glacier.md"


@pytest.mark.slow
def test_a_write_cut_short_is_seen_and_the_next_ingestion_repairs_it(tmp_path: Path, embedder: Embedder) -> None:
    source = tmp_path / "handbook"
    source.mkdir()
    (source / "long.md").write_text("\n\n".join(f"Paragraph {i}: the harbour office opens at {i} o'clock." * 4
                                                for i in range(6)), encoding="utf-8")
    uri = str(tmp_path / "milvus.db")
    store = MilvusBackend(embedder, uri, "", 30.0).collection("default")
    first = ingest_folder(source, store, chunk_size=200, chunk_overlap=20, show_progress=False)
    # As if the process died after some of the document's rows were written: one row of it is missing.
    written = store.read()
    assert written is not None
    pymilvus().MilvusClient(uri).delete(store.milvus_name, ids=[written.files["handbook/long.md"].chunk_ids[-1]])
    cut = store.read()
    assert cut is not None and cut.files["handbook/long.md"].sha256 == ""  # not taken for the whole document
    repaired = ingest_folder(source, store, chunk_size=200, chunk_overlap=20, show_progress=False)
    view = store.read()
    assert view is not None
    assert first.chunk_count >= 3 and repaired.updated == ["handbook/long.md"]
    assert view.size == first.chunk_count and view.files["handbook/long.md"].sha256 != ""
