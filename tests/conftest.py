"""Shared fixtures: settings isolated from the developer's `.env`, a real ingested corpus, and a real
uvicorn server on loopback in a thread."""

from __future__ import annotations

import gc
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from app.config import Settings
from app.rag.embeddings import Embedder, SentenceTransformerEmbedder
from app.rag.ingestion import ingest_folder
from app.rag.stores.base import DEFAULT_COLLECTION
from app.rag.stores.faiss_store import FaissCollection
from tests.ollama_wire_server import OllamaWireServer

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).parent / "fixtures" / "corpus"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test: nothing read from `.env`, small generations, greedy decoding."""
    values: dict[str, Any] = {
        "vector_store_path": tmp_path / "store",
        "lora_model_path": tmp_path / "no-adapter",
        "lora_adapters_dir": tmp_path / "no-adapters",
        "max_new_tokens": 24,
        "temperature": 0.0,
        "ollama_base_url": f"http://127.0.0.1:{closed_port()}",
        "ollama_connect_timeout": 2.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def faiss_store(embedder: Embedder, path: Path) -> FaissCollection:
    """The default collection of a FAISS store in folder `path`."""
    return FaissCollection(embedder, DEFAULT_COLLECTION, path)


def pdf_with_text(text: str, pages: int = 1) -> bytes:
    """A minimal PDF whose pages (one by default) all show `text` in Helvetica from one shared content stream,
    Flate-compressed when there are several (as a crafted file would: its text far larger than its bytes)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    compressed = pages > 1
    if compressed:
        stream = zlib.compress(stream, 9)
    page = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R "
            b"/Resources << /Font << /F1 4 0 R >> >> >>")
    kids = " ".join(f"{5 + number} 0 R" for number in range(pages)).encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
        b"<< /Length %d%s >>\nstream\n" % (len(stream), b" /Filter /FlateDecode" if compressed else b"")
        + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        *[page] * pages,
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def stop_process(process: subprocess.Popen[bytes], grace_seconds: float = 30) -> None:
    """Ask `process` to stop, and kill it when it has not within `grace_seconds`."""
    process.terminate()
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True, scope="module")
def _engines_closed_after_each_module() -> Iterator[None]:
    """The generation engines a test module started (a backend loaded directly, not served by an app whose lifespan
    closes it) are closed when the module ends: each holds a model in memory on its own thread for as long as it
    runs, and the whole suite in one process would otherwise hold twenty of them (24 GiB here)."""
    yield
    import sys

    engine_module = sys.modules.get("app.llm.engine.loop")
    if engine_module is None:  # no model was loaded in this process yet
        return
    for engine in [item for item in gc.get_objects() if isinstance(item, engine_module.GenerationEngine)]:
        engine.close(timeout=30)
    gc.collect()


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return SentenceTransformerEmbedder("embedded:all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def float32_embedder() -> Embedder:
    """The embedder in float32: the same vectors, so the same rankings, on every CPU kind (the default `auto` is
    bfloat16 where the CPU computes it natively, whose last bits differ between CPUs). For tests that compare
    retrieval quality between modes, where one question's rank decides."""
    return SentenceTransformerEmbedder("embedded:all-MiniLM-L6-v2", dtype="float32")


@pytest.fixture(scope="session")
def corpus_store(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Path:
    """The fixture corpus ingested once; copy it before changing it."""
    store = tmp_path_factory.mktemp("corpus-store")
    ingest_folder(CORPUS, faiss_store(embedder, store), chunk_size=300, chunk_overlap=50, show_progress=False)
    return store


@pytest.fixture()
def ollama() -> Iterator[OllamaWireServer]:
    """A server speaking Ollama's HTTP API on loopback, with one chat model pulled."""
    with OllamaWireServer(models=["qwen3:4b"]) as server:
        yield server


@contextmanager
def running_server(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1:<free port> in a thread; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server failed to start (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start within 180 s")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
