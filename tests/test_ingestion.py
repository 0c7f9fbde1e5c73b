"""Ingestion and the vector store, on the real embedding model and real FAISS."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.errors import ConflictError, VectorStoreError
from app.rag.embeddings import Embedder
from app.rag.ingestion import ingest_folder
from app.rag.stores.faiss_store import ingestion_lock
from app.rag.vector_store import CURRENT_FILE, DOCSTORE_FILE, INDEX_FILE, current_version, load_store
from tests.conftest import CORPUS, faiss_store, pdf_with_text

MODEL = "embedded:all-MiniLM-L6-v2"


def _ingest(source: Path, store: Path, embedder: Embedder, **kwargs: object):  # type: ignore[no-untyped-def]
    return ingest_folder(
        source, faiss_store(embedder, store), chunk_size=300, chunk_overlap=50, show_progress=False, **kwargs
    )


def test_every_format_is_indexed_with_source_and_position(corpus_store: Path, embedder: Embedder) -> None:
    store = load_store(corpus_store, expected_embedding_model=MODEL)
    sources = {chunk.metadata["source"] for chunk in store.chunks}
    assert sources == {"corpus/orchards.md", "corpus/bicycles.txt", "corpus/ferries.html", "corpus/zh/茶园.md"}
    html_text = " ".join(c.text for c in store.chunks if c.metadata["source"] == "corpus/ferries.html")
    assert "06:40" in html_text and "color: red" not in html_text and "var x" not in html_text
    assert all(isinstance(c.metadata["chunk_index"], int) for c in store.chunks)


@pytest.mark.parametrize(
    ("question", "expected_source"),
    [
        ("How heavy is a full picking basket?", "corpus/orchards.md"),
        ("What does it cost to fix a flat tyre?", "corpus/bicycles.txt"),
        ("When does the first boat to Skerry Island leave?", "corpus/ferries.html"),
        ("参观茶园要多少钱？", "corpus/zh/茶园.md"),
    ],
)
def test_retrieval_finds_the_right_file(
    corpus_store: Path, embedder: Embedder, question: str, expected_source: str
) -> None:
    store = load_store(corpus_store)
    hits = store.search(embedder.embed([question])[0], k=2)
    assert hits[0].chunk.metadata["source"] == expected_source
    assert hits[0].score >= hits[1].score


def test_store_holds_no_pickle_and_keeps_chinese_readable(corpus_store: Path) -> None:
    version = corpus_store / str(current_version(corpus_store))
    assert sorted(p.name for p in version.iterdir()) == [
        DOCSTORE_FILE, INDEX_FILE, "lexical.json", "lexical.npz", "manifest.json"
    ]
    docstore = (version / DOCSTORE_FILE).read_text(encoding="utf-8")
    assert "云雾茶园" in docstore  # stored as UTF-8 text, not \u escapes
    json.loads(docstore)
    for path in version.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"


def test_reingest_skips_unchanged_updates_changed_and_drops_removed(tmp_path: Path, embedder: Embedder) -> None:
    source = tmp_path / "docs"
    shutil.copytree(CORPUS, source)
    store = tmp_path / "store"
    first = _ingest(source, store, embedder)
    assert len(first.added) == 4 and first.version == "v000001"

    again = _ingest(source, store, embedder)
    assert again.chunks_embedded == 0 and len(again.unchanged) == 4 and again.version == "v000001"

    (source / "bicycles.txt").write_text("The workshop now repairs tyres in ten minutes.", encoding="utf-8")
    (source / "ferries.html").unlink()
    (source / "notes.pdf").write_bytes(pdf_with_text("Lighthouse keepers change shift at midnight."))
    third = _ingest(source, store, embedder)
    assert third.updated == ["docs/bicycles.txt"]
    assert third.removed == ["docs/ferries.html"]
    assert third.added == ["docs/notes.pdf"]
    loaded = load_store(store)
    texts = {c.metadata["source"]: c.text for c in loaded.chunks}
    assert "ten minutes" in texts["docs/bicycles.txt"] and "docs/ferries.html" not in texts
    assert "Lighthouse keepers" in texts["docs/notes.pdf"]
    hit = loaded.search(embedder.embed(["When do lighthouse keepers change shift?"])[0], k=1)[0]
    assert hit.chunk.metadata["source"] == "docs/notes.pdf"


def test_unreadable_pdf_is_reported_and_the_rest_indexed(tmp_path: Path, embedder: Embedder) -> None:
    source = tmp_path / "docs"
    source.mkdir()
    (source / "good.txt").write_text("Owls hunt at night.", encoding="utf-8")
    (source / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    report = _ingest(source, tmp_path / "store", embedder)
    assert report.added == ["docs/good.txt"] and "docs/broken.pdf" in report.failed


def test_tampered_store_is_refused(tmp_path: Path, corpus_store: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(corpus_store, store)
    docstore = store / str(current_version(store)) / DOCSTORE_FILE
    docstore.write_text(docstore.read_text(encoding="utf-8").replace("eighteen", "eighty"), encoding="utf-8")
    with pytest.raises(VectorStoreError, match="checksum"):
        load_store(store)


def test_crash_before_the_switch_leaves_the_old_store_live(
    tmp_path: Path, corpus_store: Path, embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    shutil.copytree(corpus_store, store)
    before = load_store(store)

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("app.rag.vector_store.os.replace", crash)
    with pytest.raises(OSError):
        _ingest(CORPUS, store, embedder, rebuild=True)
    after = load_store(store)
    assert after.version == before.version and after.size == before.size
    assert (store / CURRENT_FILE).read_text().strip() == before.version


def test_second_ingestion_at_once_is_refused(tmp_path: Path, embedder: Embedder) -> None:
    store = tmp_path / "store"
    with ingestion_lock(store), pytest.raises(ConflictError):
        _ingest(CORPUS, store, embedder)


def test_changed_embedding_model_is_refused_on_load(corpus_store: Path) -> None:
    with pytest.raises(VectorStoreError, match="rebuild"):
        load_store(corpus_store, expected_embedding_model="ollama:bge-m3")
