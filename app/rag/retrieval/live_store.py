"""The store version being served, swapped whole by `reload` (after an ingestion, a rebuild, a rollback)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from app.errors import VectorStoreError
from app.rag.embeddings import Embedder
from app.rag.vector_store import VectorStore, load_store

logger = logging.getLogger(__name__)


class LiveStore:
    """The loaded live version of the store at `store_path`, and the embedder its vectors were made with."""

    def __init__(self, embedder: Embedder, store_path: Path) -> None:
        self.embedder = embedder
        self.store_path = store_path
        self._store: VectorStore | None = None
        self.load_error: str | None = None
        # One load at a time, each reading CURRENT when it starts: the last to run serves the newest CURRENT
        # (two loads racing could otherwise put an older version back after a newer one).
        self._loading = threading.Lock()

    @property
    def store(self) -> VectorStore | None:
        return self._store

    def reload(self) -> VectorStore | None:
        """Load the store's live version and return it; on failure keep serving the last good one
        and return None (`load_error` says why)."""
        with self._loading:
            return self._reload_locked()

    def serve_live_version(self) -> VectorStore:
        """Load and serve the live version just written (a rebuild, a rollback, a document change); VectorStoreError
        when it cannot be loaded, saying which version still serves."""
        store = self.reload()
        if store is None:
            still = f"still serving {self._store.version}" if self._store else "no version is being served"
            raise VectorStoreError(f"the live version could not be loaded ({self.load_error}); {still}")
        return store

    def _reload_locked(self) -> VectorStore | None:
        try:
            store = load_store(self.store_path, expected_embedding_model=self.embedder.name)
        except VectorStoreError as error:
            self.load_error = error.message
            logger.error("vector store not loaded: %s", error.message)
            return None
        self._store, self.load_error = store, None
        logger.info("vector store %s loaded: %d chunks", store.version, store.size)
        return store
