"""Vector store administration while the service runs: rebuild, list versions, roll back.

Each operation changes the store on disk under the ingestion lock (a second one, or a `scripts/ingest.py`
run, gets ConflictError), then the live store loads the live version and swaps it in whole, so requests
see the old version or the new one and no restart is needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio

from app.config import Settings
from app.rag.ingestion import IngestReport, ingest_with_settings, roll_back
from app.rag.retrieval.live_store import LiveStore
from app.rag.vector_store import VectorStore, VersionInfo, current_version, list_versions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebuildResult:
    report: IngestReport
    serving: VectorStore  # the version now answering requests


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
    def __init__(self, settings: Settings, live: LiveStore) -> None:
        self._settings = settings
        self._live = live

    async def rebuild(self, rebuild: bool) -> RebuildResult:
        """Ingest SAMPLE_CORPUS_PATH (new and changed files; `rebuild`: every file) and serve the result."""
        report = await anyio.to_thread.run_sync(self._ingest, rebuild)
        store = await self._serve_live_version()
        logger.info("vector store rebuilt: %s, %d chunks in %.1f s", store.version, store.size, report.seconds)
        return RebuildResult(report, store)

    async def versions(self) -> StoreVersions:
        store = self._live.store
        path = self._settings.vector_store_path
        current, kept = await anyio.to_thread.run_sync(lambda: (current_version(path), list_versions(path)))
        return StoreVersions(current, store.version if store else None, kept)

    async def rollback(self, version: str) -> RollbackResult:
        """Verify `version` and make it live; the version served until now is kept for a roll forward."""
        previous = self._live.store
        await anyio.to_thread.run_sync(
            roll_back, self._settings.vector_store_path, version, self._live.embedder.name
        )
        store = await self._serve_live_version()
        logger.info("vector store rolled back to %s", store.version)
        return RollbackResult(store.version, previous.version if previous else None, store.size)

    def _ingest(self, rebuild: bool) -> IngestReport:
        # The server's embedder: loading a second copy would cost seconds and memory for nothing.
        return ingest_with_settings(
            self._settings,
            self._settings.sample_corpus_path,
            rebuild=rebuild,
            show_progress=False,
            embedder=self._live.embedder,
        )

    async def _serve_live_version(self) -> VectorStore:
        return await anyio.to_thread.run_sync(self._live.serve_live_version)
