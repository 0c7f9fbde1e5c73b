"""Documents and collections over HTTP, on a real server with the real embedder and store (answers from the
Ollama backend on the wire-protocol server: what is checked here is which passages answers are given from)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.errors import NotFoundError
from app.main import create_app
from app.rag.embeddings import Embedder
from app.rag.ingestion import add_document, remove_document
from app.rag.vector_store import list_versions, load_store
from tests.conftest import REPO_ROOT, faiss_store, make_settings, pdf_with_text, running_server
from tests.ollama_wire_server import OllamaWireServer

USER_KEY = "user-key-documents"
ADMIN_KEY = "admin-key-documents"
USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

LIGHTHOUSE = "灯塔管理员每天午夜换班，换班时要检查透镜和燃油。The lighthouse keepers change shift at midnight."
GLACIER = "Glacier tours leave from the north pier at seven; crampons are lent at the harbour office."
ORCHARD = "The orchard's apple harvest starts in late September; pickers are paid by the crate."


@contextmanager
def _client(tmp_path: Path, ollama: OllamaWireServer, **overrides: Any) -> Iterator[httpx.Client]:
    values: dict[str, Any] = {"vector_store_path": tmp_path / "store", "use_lora_default": False,
                              "ollama_base_url": ollama.base_url, "api_keys": USER_KEY, "admin_api_keys": ADMIN_KEY}
    app = create_app(make_settings(tmp_path, **{**values, **overrides}))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def _upload(client: httpx.Client, name: str, data: bytes | str, collection: str | None = None) -> httpx.Response:
    content = data.encode() if isinstance(data, str) else data
    form = {"collection": collection} if collection is not None else None
    return client.post("/documents", files={"file": (name, content)}, data=form, headers=ADMIN)


def _cited(client: httpx.Client, query: str, **fields: Any) -> list[str]:
    response = client.post("/ask", json={"query": query, **fields}, headers=USER)
    assert response.status_code == 200, response.text
    return [source["metadata"]["source"] for source in response.json()["source_documents"]]


def test_an_uploaded_document_is_found_by_the_next_question_and_never_again_once_deleted(
    tmp_path: Path, ollama: OllamaWireServer
) -> None:
    with _client(tmp_path, ollama) as client:
        first = _upload(client, "glacier.md", GLACIER)
        added = _upload(client, "灯塔.md", LIGHTHOUSE)
        cited = _cited(client, "灯塔管理员什么时候换班？")
        again = _upload(client, "灯塔-copy.md", LIGHTHOUSE)  # the same content under another name
        listed = client.get("/documents", headers=ADMIN).json()["documents"]
        deleted = client.delete(f"/documents/{added.json()['document_id']}", headers=ADMIN)
        questions = ("灯塔管理员什么时候换班？", "lighthouse shift midnight")
        cited_after = [_cited(client, question) for question in questions]
        deleted_again = client.delete(f"/documents/{added.json()['document_id']}", headers=ADMIN)
        listed_after = client.get("/documents", headers=ADMIN).json()["documents"]
    assert first.status_code == 201 and added.status_code == 201, added.text
    body = added.json()
    assert body["source"] == "灯塔.md" and body["collection"] == "default" and body["chunks"] >= 1
    assert cited[0] == "灯塔.md"
    assert again.status_code == 200 and again.json() == body  # no duplicate: the document already there
    assert sorted(d["source"] for d in listed) == ["glacier.md", "灯塔.md"]
    entry = next(d for d in listed if d["source"] == "灯塔.md")
    assert entry["document_id"] == body["document_id"] and entry["chunks"] == body["chunks"]
    assert entry["ingested_at"].startswith("20")  # an ISO time
    assert deleted.status_code == 200 and deleted.json() == {**body, "purged_versions": []}
    assert all("灯塔.md" not in sources for sources in cited_after)
    assert cited_after[0], "the remaining document still answers"
    assert deleted_again.status_code == 404 and deleted_again.json()["error"] == "document_not_found"
    assert [d["source"] for d in listed_after] == ["glacier.md"]
    store = load_store(tmp_path / "store")  # what is on disk: both indexes without the deleted chunks
    assert "灯塔.md" not in store.files and all("灯塔" not in chunk.text for chunk in store.chunks)
    assert store.lexical.size == store.index.ntotal == len(store.chunks)


def _store_bytes(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


def test_a_purging_delete_leaves_no_copy_on_disk_and_the_kept_versions_still_roll_back(
    tmp_path: Path, ollama: OllamaWireServer
) -> None:
    vault = "The vault code is 4417-SECRET-SENTINEL; tell no one."
    diary = "Diary: the harbour master hides the spare keys under the bell. DIARY-SENTINEL"
    with _client(tmp_path, ollama) as client:
        _upload(client, "glacier.md", GLACIER)  # v000001
        doomed = _upload(client, "vault.md", vault).json()  # v000002
        plain = _upload(client, "diary.md", diary).json()  # v000003
        deleted = client.delete(f"/documents/{plain['document_id']}", headers=ADMIN)  # v000004, not purged
        purged = client.delete(f"/documents/{doomed['document_id']}", params={"purge": "true"}, headers=ADMIN)
        versions = client.get("/admin/vector-store/versions", headers=ADMIN).json()["versions"]  # the last three
        rolled = client.post("/admin/vector-store/rollback", json={"version": "v000003"}, headers=ADMIN)
        after_rollback = client.get("/documents", headers=ADMIN).json()["documents"]
        cited = _cited(client, "What is the vault code?")
        bad = client.delete(f"/documents/{doomed['document_id']}", params={"purge": "maybe"}, headers=ADMIN)
    on_disk = _store_bytes(tmp_path / "store")
    assert deleted.status_code == 200 and deleted.json()["purged_versions"] == []
    assert diary.encode() in on_disk  # a plain delete leaves it in the kept versions (docs/guide/security.md)
    assert purged.status_code == 200, purged.text
    assert purged.json()["purged_versions"] == ["v000003", "v000004"]  # the kept versions that held it
    assert vault.encode() not in on_disk and b"4417" not in on_disk
    assert [v["version"] for v in versions] == ["v000003", "v000004", "v000005"]
    assert all(v["problem"] is None for v in versions)  # each rewritten version is whole, checksums and all
    assert rolled.status_code == 200, rolled.text
    assert sorted(d["source"] for d in after_rollback) == ["diary.md", "glacier.md"]
    assert "vault.md" not in cited
    assert bad.status_code == 422


def test_collections_keep_their_documents_apart(tmp_path: Path, ollama: OllamaWireServer) -> None:
    source = tmp_path / "manuals"
    source.mkdir()
    (source / "orchard.txt").write_text(ORCHARD, encoding="utf-8")
    with _client(tmp_path, ollama) as client:
        in_default = _upload(client, "glacier.md", GLACIER)
        in_tours = _upload(client, "灯塔.md", LIGHTHOUSE, collection="tours")
        # Ingested from the command line while the server runs: the server finds the new collection.
        ingest = subprocess.run(
            [sys.executable, "scripts/ingest.py", "--source", str(source), "--store", str(tmp_path / "store"),
             "--collection", "果园", "--quiet"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )
        asked = {name: _cited(client, "when do the lighthouse keepers change shift and glacier tours leave?",
                              collection=name) for name in ("default", "tours", "果园")}
        unknown = client.post("/ask", json={"query": "glacier?", "collection": "nope"}, headers=USER)
        chat = client.post("/v1/chat/completions", headers=USER, json={
            "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "glacier tours?"}],
            "max_tokens": 4, "rag": True, "collection": "tours"})
        collections = client.get("/collections", headers=USER)
        listed = client.get("/documents", params={"collection": "tours"}, headers=ADMIN).json()["documents"]
        listed_unknown = client.get("/documents", params={"collection": "nope"}, headers=ADMIN)
        bad_name = _upload(client, "a.md", GLACIER, collection="../escape")
        # Case, width, and characters of other scripts that look the same (Cyrillic о and ѕ: UTS #39 confusables).
        look_alikes = [_upload(client, "b.md", ORCHARD, collection=name) for name in ("TOURS", "ｔｏｕｒｓ", "tоurѕ")]
        distinct = _upload(client, "c.md", ORCHARD, collection="tour")  # a different name is a new collection
    assert in_default.status_code == 201 and in_tours.status_code == 201
    assert in_tours.json()["collection"] == "tours"
    assert ingest.returncode == 0, ingest.stderr
    assert set(asked["default"]) == {"glacier.md"}
    assert set(asked["tours"]) == {"灯塔.md"}
    assert set(asked["果园"]) == {"manuals/orchard.txt"}
    assert unknown.status_code == 404 and unknown.json()["error"] == "collection_not_found"
    assert "default, tours, 果园" in unknown.json()["message"]
    assert chat.status_code == 200, chat.text
    assert {s["metadata"]["source"] for s in chat.json()["sources"]} == {"灯塔.md"}
    assert collections.status_code == 200
    assert collections.json()["collections"] == [
        {"name": "default", "documents": 1, "chunks": 1},
        {"name": "tours", "documents": 1, "chunks": 1},
        {"name": "果园", "documents": 1, "chunks": 1},
    ]
    assert [(d["source"], d["collection"]) for d in listed] == [("灯塔.md", "tours")]
    assert listed_unknown.status_code == 404
    assert bad_name.status_code == 422 and "collection" in bad_name.json()["message"]
    assert all(r.status_code == 409 and "'tours'" in r.json()["message"] for r in look_alikes)
    assert "looks like" in look_alikes[2].json()["message"]
    assert distinct.status_code == 201, distinct.text
    assert (tmp_path / "store" / "collections" / "tours").is_dir()
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(
    ("name", "data", "status", "code"),
    [
        ("empty.txt", b"", 400, "empty_document"),
        ("../notes.txt", b"path parts", 400, "invalid_file_name"),
        ("photo.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, 415, "unsupported_media_type"),
        ("archive.md", b"PK\x03\x04" + b"\0" * 200, 415, "unsupported_media_type"),
        ("binary.txt", b"text\0with\0nul\0bytes" * 10, 415, "unsupported_media_type"),
        ("program.exe", b"MZ\x90\x00", 415, "unsupported_media_type"),
        ("fake.pdf", b"plain text pretending to be a PDF", 415, "unsupported_media_type"),
        ("renamed.txt", pdf_with_text("a PDF named as text"), 415, "unsupported_media_type"),
        ("broken.pdf", b"%PDF-1.4 this is not really a pdf", 422, "unreadable_document"),
        ("blank.pdf", pdf_with_text(""), 422, "unreadable_document"),
        ("big.txt", b"word " * 4000, 413, "payload_too_large"),  # over MAX_UPLOAD_MB=0.01 below
        ("huge.txt", b"word " * 40000, 413, "payload_too_large"),  # over the request guard's limit already
    ],
)
def test_a_bad_upload_is_refused_and_leaves_the_store_as_it_was(
    tmp_path: Path, ollama: OllamaWireServer, name: str, data: bytes, status: int, code: str
) -> None:
    with _client(tmp_path, ollama, max_upload_mb=0.01) as client:
        assert _upload(client, "glacier.md", GLACIER).status_code == 201
        before = [v.version for v in list_versions(tmp_path / "store")]
        refused = _upload(client, name, data)
        documents = client.get("/documents", headers=ADMIN).json()["documents"]
    assert refused.status_code == status, refused.text
    assert refused.json()["error"] == code and refused.json()["message"]
    assert "Traceback" not in refused.text
    assert [v.version for v in list_versions(tmp_path / "store")] == before
    assert [d["source"] for d in documents] == ["glacier.md"]


def test_a_real_pdf_and_html_upload_are_indexed(tmp_path: Path, ollama: OllamaWireServer) -> None:
    html = "<html><body><script>var hidden = 1;</script><p>Ferries to the island run hourly.</p></body></html>"
    with _client(tmp_path, ollama) as client:
        pdf = _upload(client, "keepers.pdf", pdf_with_text("Lighthouse keepers change shift at midnight."))
        page = _upload(client, "ferries.html", html)
        cited = _cited(client, "How often do ferries run to the island?")
    assert pdf.status_code == 201 and page.status_code == 201
    assert cited[0] == "ferries.html"
    texts = [chunk.text for chunk in load_store(tmp_path / "store").chunks]
    assert any("Lighthouse keepers" in text for text in texts)
    assert not any("hidden" in text for text in texts)


def test_concurrent_uploads_all_land_and_documents_need_an_admin_key(
    tmp_path: Path, ollama: OllamaWireServer
) -> None:
    with _client(tmp_path, ollama) as client:
        results: dict[int, httpx.Response] = {}

        def upload(number: int) -> None:
            results[number] = _upload(client, f"note-{number}.txt", f"Note {number}: locker {number} is by door "
                                      f"{number * 7}.")

        threads = [threading.Thread(target=upload, args=(number,)) for number in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        listed = client.get("/documents", headers=ADMIN).json()["documents"]
        as_user = [client.get("/documents", headers=USER),
                   client.post("/documents", files={"file": ("x.txt", b"x")}, headers=USER)]
        collections_as_user = client.get("/collections", headers=USER)
    assert sorted(r.status_code for r in results.values()) == [201] * 4
    assert sorted(d["source"] for d in listed) == [f"note-{n}.txt" for n in range(4)]
    store = load_store(tmp_path / "store")  # one consistent version with all four
    assert sorted(store.files) == [f"note-{n}.txt" for n in range(4)]
    assert all(response.status_code == 403 for response in as_user)
    assert collections_as_user.status_code == 200


def test_uploads_survive_a_rebuild_and_a_name_keeps_its_own_content(tmp_path: Path, ollama: OllamaWireServer) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "orchard.txt").write_text(ORCHARD, encoding="utf-8")
    mentions_pdf = "A note on formats: a PDF file starts with %PDF-1.4 and ends with %%EOF."
    with _client(tmp_path, ollama, sample_corpus_path=folder) as client:
        assert _upload(client, "glacier.md", GLACIER).status_code == 201
        assert _upload(client, "灯塔.md", LIGHTHOUSE).status_code == 201
        rebuilt = client.post("/admin/vector-store/rebuild", json={"rebuild": True}, headers=ADMIN)
        listed = sorted(d["source"] for d in client.get("/documents", headers=ADMIN).json()["documents"])
        cited = _cited(client, "灯塔管理员什么时候换班？")
        clash = _upload(client, "glacier.md", LIGHTHOUSE)  # that content is 灯塔.md already
        text_about_pdf = _upload(client, "formats.md", mentions_pdf)
    assert rebuilt.status_code == 200, rebuilt.text
    assert listed == ["docs/orchard.txt", "glacier.md", "灯塔.md"]  # re-embedded, not dropped
    assert cited[0] == "灯塔.md"
    assert clash.status_code == 409 and "灯塔.md" in clash.json()["message"]
    assert text_about_pdf.status_code == 201, text_about_pdf.text
    assert any("Glacier tours" in chunk.text for chunk in load_store(tmp_path / "store").chunks)


def test_a_delete_removes_only_the_content_it_named(tmp_path: Path, embedder: Embedder) -> None:
    store = tmp_path / "store"
    first = add_document(faiss_store(embedder, store), "a.md", GLACIER, "1" * 64, chunk_size=300, chunk_overlap=50)
    # replaced meanwhile:
    add_document(faiss_store(embedder, store), "a.md", ORCHARD, "2" * 64, chunk_size=300, chunk_overlap=50)
    with pytest.raises(NotFoundError):
        remove_document(faiss_store(embedder, store), "a.md", first.sha256)
    assert load_store(store).files["a.md"].sha256 == "2" * 64


def test_uploads_past_a_document_bound_are_refused_naming_it_and_nothing_is_written(
    tmp_path: Path, ollama: OllamaWireServer
) -> None:
    """A 5 KB PDF whose 20 pages share one compressed 1 MB text (20 million characters), nested HTML whose parse
    runs past its time or memory bound, and a text of more chunks than allowed: each refused with the bound named,
    the server answering meanwhile, and the store as it was."""
    expanding_pdf = pdf_with_text("lalala " * 150_000, pages=20)
    nested_html = b"<div>" * 1_200_000  # Python's HTML parser takes tens of seconds and gigabytes over this
    with _client(tmp_path, ollama, upload_parse_seconds=3, max_document_chunks=3) as client:
        assert _upload(client, "glacier.md", GLACIER).status_code == 201
        refused = {
            "pdf": _upload(client, "expanding.pdf", expanding_pdf),
            "html": _upload(client, "nested.html", nested_html),
            "chunks": _upload(client, "long.md", "\n\n".join(ORCHARD for _ in range(40))),
        }
        listed = [d["source"] for d in client.get("/documents", headers=ADMIN).json()["documents"]]
        alive = client.get("/health/live")
    with _client(tmp_path / "memory", ollama, upload_parse_mb=256) as client:
        over_memory = _upload(client, "nested.html", nested_html)
    assert len(expanding_pdf) < 10_000
    assert refused["pdf"].status_code == 413 and "MAX_DOCUMENT_CHARS=2000000" in refused["pdf"].json()["message"]
    assert refused["html"].status_code == 422 and "UPLOAD_PARSE_SECONDS=3" in refused["html"].json()["message"]
    assert refused["chunks"].status_code == 413 and "MAX_DOCUMENT_CHUNKS=3" in refused["chunks"].json()["message"]
    assert over_memory.status_code == 413 and "UPLOAD_PARSE_MB=256" in over_memory.json()["message"]
    assert listed == ["glacier.md"] and alive.status_code == 200


def test_an_upload_whose_client_leaves_is_not_written(tmp_path: Path, ollama: OllamaWireServer) -> None:
    """The client hangs up while its (long) document is being embedded: it never appears, and the next upload,
    which waits for the abandoned one to let go of the collection, lands."""
    long_document = "\n\n".join(f"Section {n}. " + ORCHARD * 3 for n in range(1500))
    with _client(tmp_path, ollama) as client:
        url = str(client.base_url)

        async def leave_early() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=300) as leaving:
                upload = asyncio.create_task(leaving.post(
                    "/documents", files={"file": ("long.md", long_document.encode())}, headers=ADMIN))
                await asyncio.sleep(3)  # read, chunked, embedding
                assert not upload.done()
                upload.cancel()  # the client hangs up
                with contextlib.suppress(asyncio.CancelledError):
                    await upload

        asyncio.run(leave_early())
        after = _upload(client, "glacier.md", GLACIER)
        listed = [d["source"] for d in client.get("/documents", headers=ADMIN).json()["documents"]]
    assert after.status_code == 201, after.text
    assert listed == ["glacier.md"]


def test_a_collection_name_over_255_bytes_is_refused_and_leaves_no_collection(
    tmp_path: Path, ollama: OllamaWireServer
) -> None:
    long_name = "\U00020000" * 64  # 64 letters (CJK Extension B), 256 bytes in UTF-8: no folder can be named so
    with _client(tmp_path, ollama) as client:
        upload = _upload(client, "glacier.md", GLACIER, collection=long_name)
        asked = client.post("/ask", json={"query": "glacier tours?", "collection": long_name}, headers=USER)
        collections = client.get("/collections", headers=ADMIN).json()["collections"]
        fine = _upload(client, "glacier.md", GLACIER, collection="\U00020000" * 63)
    assert upload.status_code == 422 and "256 bytes" in upload.json()["message"], upload.text
    assert asked.status_code == 422, asked.text
    assert long_name not in [entry["name"] for entry in collections]
    assert fine.status_code == 201, fine.text


def test_a_new_collection_is_not_there_until_its_first_document_is(tmp_path: Path, ollama: OllamaWireServer) -> None:
    """While a new collection's first (long) document is being embedded, questions in it are a 404 and listings
    leave it out, as before the upload; once written, it answers."""
    long_document = "\n\n".join(f"Section {n}. " + GLACIER * 3 for n in range(800))
    with _client(tmp_path, ollama) as client:
        url = str(client.base_url)

        async def ask_while_written() -> tuple[httpx.Response, httpx.Response, list[str], httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=300) as other:
                upload = asyncio.create_task(other.post(
                    "/documents", files={"file": ("glaciers.md", long_document.encode())}, data={"collection": "new"},
                    headers=ADMIN))
                await asyncio.sleep(2)  # read, chunked, embedding
                assert not upload.done()
                asked = await other.post("/ask", json={"query": "glacier tours?", "collection": "new"}, headers=USER)
                listed = (await other.get("/collections", headers=ADMIN)).json()["collections"]
                uploaded = await upload
                return asked, uploaded, [entry["name"] for entry in listed], await other.post(
                    "/ask", json={"query": "glacier tours?", "collection": "new"}, headers=USER)

        during, uploaded, listed, after = asyncio.run(ask_while_written())
    assert during.status_code == 404 and during.json()["error"] == "collection_not_found", during.text
    assert "new" not in listed
    assert uploaded.status_code == 201 and after.status_code == 200, after.text
