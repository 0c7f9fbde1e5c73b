"""kill -9 of a real `scripts/ingest.py` at several points never leaves the vector store unusable.

The store holds a good old version; each run rebuilds it from a bigger folder and is killed with SIGKILL
after fixed delays and as soon as its writes show on disk. After every kill the store loads (old or new
content, whole), the lock is free, and in the end an ingestion runs to completion over the leftovers.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.rag.embeddings import Embedder
from app.rag.ingestion import ingest_folder
from app.rag.stores.faiss_store import ingestion_lock
from app.rag.vector_store import current_version, list_versions, load_store
from tests.conftest import REPO_ROOT, faiss_store

pytestmark = pytest.mark.slow

MODEL = "embedded:all-MiniLM-L6-v2"
WORDS = "tide ferry harbour lamp keeper orchard basket tyre valve bell rope net gull pier".split()


def _write_documents(folder: Path, count: int, first: int = 0) -> None:
    generator = random.Random(first)
    for number in range(first, first + count):
        text = f"Document {number}. " + " ".join(generator.choice(WORDS) for _ in range(150))
        (folder / f"doc{number:03d}.txt").write_text(text, encoding="utf-8")


def _start_ingestion(source: Path, store: Path, cwd: Path) -> subprocess.Popen[bytes]:
    # cwd: a folder without `.env`, so only the defaults and these arguments apply.
    command = [sys.executable, str(REPO_ROOT / "scripts" / "ingest.py"), "--source", str(source),
               "--store", str(store), "--rebuild", "--quiet"]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when(process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 240) -> bool:
    """SIGKILL the process as soon as `ready()`; False when it ended on its own first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if ready():
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return True
        assert time.monotonic() < deadline, "the ingestion neither reached the kill point nor ended"
        time.sleep(0.001)
    return False


def _after(seconds: float) -> Callable[[], bool]:
    started = time.monotonic()
    return lambda: time.monotonic() - started > seconds


def _appears(store: Path, pattern: str) -> Callable[[], bool]:
    return lambda: any(store.glob(pattern))


def _switched(store: Path) -> Callable[[], bool]:
    before = current_version(store)
    return lambda: current_version(store) != before


def _new_version(store: Path) -> Callable[[], bool]:
    before = {path.name for path in store.glob("v[0-9]*")}
    return lambda: bool({path.name for path in store.glob("v[0-9]*")} - before)


def test_sigkill_at_any_point_leaves_a_loadable_store_and_a_free_lock(
    tmp_path: Path, embedder: Embedder
) -> None:
    source, store = tmp_path / "docs", tmp_path / "store"
    source.mkdir()
    _write_documents(source, 3)
    old_version = ingest_folder(
        source, faiss_store(embedder, store), chunk_size=500, chunk_overlap=80, show_progress=False
    ).version
    old_sources = {chunk.metadata["source"] for chunk in load_store(store).chunks}
    _write_documents(source, 30, first=3)
    new_sources = {f"docs/{path.name}" for path in source.iterdir()}

    kill_points: dict[str, Callable[[], Callable[[], bool]]] = {
        "during start-up (2 s)": lambda: _after(2.0),
        "while reading and embedding (9 s)": lambda: _after(9.0),
        "staging folder created": lambda: _appears(store, ".writing-*"),
        "index written to the staging folder": lambda: _appears(store, ".writing-*/index.faiss"),
        "lexical index being written": lambda: _appears(store, ".writing-*/lexical.npz"),
        "manifest written, just before the rename": lambda: _appears(store, ".writing-*/manifest.json"),
        "new version folder in place": lambda: _new_version(store),
        "CURRENT switched, old versions being pruned": lambda: _switched(store),
    }
    outcomes: dict[str, str] = {}
    for point, make_condition in kill_points.items():
        condition = make_condition()  # before the start: the delays count from here, the new folder is new
        killed = _kill_when(_start_ingestion(source, store, tmp_path), condition)
        loaded = load_store(store, expected_embedding_model=MODEL)  # raises if the live version is not whole
        sources = {chunk.metadata["source"] for chunk in loaded.chunks}
        assert sources in (old_sources, new_sources), point
        if sources == old_sources:
            assert loaded.version == old_version, point
        hit = loaded.search(embedder.embed(["Document 1. tide ferry"])[0], k=1)[0]
        assert hit.chunk.metadata["source"] in sources
        # The lexical index loaded with the same version, whole: it finds what the docstore holds.
        assert loaded.lexical.size == loaded.size
        assert loaded.search_lexical("document 1", k=1)[0].chunk.metadata["source"] in sources
        with ingestion_lock(store):  # the dead process's lock went with it
            pass
        outcomes[point] = f"{'killed' if killed else 'finished first'}, serving {loaded.version} " + (
            "(old content)" if sources == old_sources else "(new content)"
        )
    print("\n".join(f"{point}: {outcome}" for point, outcome in outcomes.items()))
    assert any(outcome.startswith("killed") and "old content" in outcome for outcome in outcomes.values())
    assert outcomes["CURRENT switched, old versions being pruned"].endswith("(new content)")

    (store / ".writing-planted").mkdir()  # as a kill mid-write leaves it, in case no kill above did
    (store / ".writing-planted" / "index.faiss").write_bytes(b"IxF2 truncated")
    finished = _start_ingestion(source, store, tmp_path)
    _, errors = finished.communicate(timeout=300)
    assert finished.returncode == 0, errors.decode()
    final = load_store(store, expected_embedding_model=MODEL)
    assert {chunk.metadata["source"] for chunk in final.chunks} == new_sources
    assert final.version == current_version(store) and final.version != old_version
    assert not list(store.glob(".writing-*"))  # half-written leftovers are cleared
    assert all(version.problem is None for version in list_versions(store))
