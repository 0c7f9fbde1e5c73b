"""Vector store administration while the service runs: rebuild, list versions, roll back.

Each operation changes the store under the collection's one-writer lock (a second one, or a `scripts/ingest.py`
run, gets ConflictError), then the collection serves the new content whole, so requests see the old version or
the new one and no restart is needed. Versions are FAISS's: a Milvus store has none to list or roll back to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio

from app.config import Settings
from app.errors import NotSupportedError
from app.rag.ingestion import IngestReport, ingest_folder
from app.rag.stores.base import CollectionStore, StoreView
from app.rag.stores.faiss_store import FaissCollection
from app.rag.vector_store import VectorStore, VersionInfo, current_version, list_versions, switch_version

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebuildResult:
    report: IngestReport
    serving: StoreView  # the content now answering requests


@dataclass(frozen=True)
class StoreVersions:
    current: str | None  # named by CURRENT on disk
    serving: str | None  # loaded and searched (differs when a load failed)
    versions: list[VersionInfo]


@dataclass(frozen=True)
class RollbackResult:
    version: str
    previous: str | None
    chunk_count: int


class VectorStoreAdmin:
    def __init__(self, settings: Settings, live: CollectionStore) -> None:
        self._settings = settings
        self._live = live

    async def rebuild(self, rebuild: bool) -> RebuildResult:
        """Ingest SAMPLE_CORPUS_PATH (new and changed files; `rebuild`: every file) and serve the result."""
        report = await anyio.to_thread.run_sync(self._ingest, rebuild)
        store = await anyio.to_thread.run_sync(self._live.serve_live_version)
        logger.info("vector store rebuilt: %s, %d chunks in %.1f s", store.version or "-", report.chunk_count,
                    report.seconds)
        return RebuildResult(report, store)

    async def versions(self) -> StoreVersions:
        faiss = self._versioned()
        store = faiss.store
        current, kept = await anyio.to_thread.run_sync(lambda: (current_version(faiss.path), list_versions(faiss.path)))
        return StoreVersions(current, store.version if store else None, kept)

    async def rollback(self, version: str) -> RollbackResult:
        """Verify `version` and make it live; the version served until now is kept for a roll forward."""
        faiss = self._versioned()
        previous = faiss.store
        await anyio.to_thread.run_sync(_roll_back, faiss, version)
        store = await anyio.to_thread.run_sync(faiss.serve_live_version)
        logger.info("vector store rolled back to %s", store.version)
        return RollbackResult(store.version, previous.version if previous else None, store.size)

    def _versioned(self) -> FaissCollection:
        if not isinstance(self._live, FaissCollection):
            raise NotSupportedError(
                f"VECTOR_STORE_BACKEND={self._live.kind} keeps no versions to list or roll back to "
                "(only faiss does); back up the collection with its own tools instead"
            )
        return self._live

    def _ingest(self, rebuild: bool) -> IngestReport:
        # The server's collection and embedder: loading a second copy would cost seconds and memory for nothing.
        return ingest_folder(
            self._settings.sample_corpus_path,
            self._live,
            chunk_size=self._settings.chunk_size,
            chunk_overlap=self._settings.chunk_overlap,
            rebuild=rebuild,
            show_progress=False,
        )


def _roll_back(collection: FaissCollection, version: str) -> VectorStore:
    """Make a kept version live again, verified first; under the writer lock, so no ingestion switches or prunes
    versions meanwhile (one running: ConflictError)."""
    with collection.writing():
        return switch_version(collection.path, version, expected_embedding_model=collection.embedder.name)
