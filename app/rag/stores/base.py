"""Where a collection's chunks live: the interfaces every kind of store (VECTOR_STORE_BACKEND) implements.

Collections, ingestion, the documents API, the retrievers and /health see only these:
- `StoreView`: one collection's content as a search or an ingestion reads it (a loaded FAISS version, or a
  Milvus collection queried live);
- `CollectionStore`: one collection: the view it serves, its live content read now, one writer at a time, and a
  change applied (documents added or replaced, documents removed);
- `StoreBackend`: the collections one kind of store holds.
A new kind of store is one module implementing them and one line in `registry.STORES`.
"""

from __future__ import annotations

import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from app.errors import ValidationFailedError, VectorStoreError
from app.rag.embeddings import Embedder
from app.rag.vector_store import FileEntry, SearchHit, StoredChunk

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "default"
# Letters (any script: Chinese names too), digits, '_' and '-', starting with a letter or digit: a name is a
# folder name (FAISS) and part of a collection name (Milvus), so no '.', no separator and nothing hidden.
COLLECTION_NAME = re.compile(r"[^\W_][\w-]{0,63}")


#: A collection is a folder (FAISS): its name must fit a file name, 255 bytes on common file systems (64 characters
#: of four UTF-8 bytes each would not).
COLLECTION_NAME_BYTES = 255


def check_collection_name(name: str) -> str:
    if not COLLECTION_NAME.fullmatch(name):
        raise ValidationFailedError(
            f"collection {name[:80]!r} is not a valid name: 1 to 64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    if len(name.encode("utf-8")) > COLLECTION_NAME_BYTES:
        raise ValidationFailedError(
            f"collection {name[:20]!r}... is {len(name.encode('utf-8'))} bytes in UTF-8; a name may hold at most "
            f"{COLLECTION_NAME_BYTES} (it names a folder)"
        )
    return name


class StoreUnavailableError(VectorStoreError):
    """The store cannot be reached now (a database down, a folder locked by another process): what it holds is
    unknown, so nothing may be rebuilt in its place."""


class StoreView(Protocol):
    """One collection's content, as searched and as an ingestion compares files against."""

    @property
    def version(self) -> str: ...  # the FAISS version folder; "" where the store keeps no versions

    @property
    def created_at(self) -> str: ...  # when this version was written; "" where unknown

    @property
    def embedding_model(self) -> str: ...

    @property
    def size(self) -> int: ...  # chunks

    @property
    def files(self) -> Mapping[str, FileEntry]: ...  # by source; chunk ids as `SearchHit.chunk_id` gives them

    def search(self, query_vector: np.ndarray, k: int) -> list[SearchHit]:
        """The `k` chunks of the highest cosine similarity to `query_vector` (normalised), best first."""
        ...

    def search_lexical(self, query: str, k: int) -> list[SearchHit]:
        """The `k` chunks of the best BM25 score for `query`'s words; only chunks that share a word with it."""
        ...

    def best_lexical_score(self, query: str) -> float:
        """The best BM25 score `query`'s words could reach here: each word's best score in any chunk, summed
        (the calibrated fusion's scale, see `retrieval.hybrid`)."""
        ...

    def chunks_of(self, source: str) -> list[StoredChunk]:
        """The chunks of document `source`, in order."""
        ...


@dataclass(frozen=True)
class NewDocument:
    """A document's chunks with their vectors, to be written."""

    source: str
    sha256: str
    chunks: list[StoredChunk]
    vectors: np.ndarray  # one row per chunk
    ingested_at: str


class CollectionStore(ABC):
    """One collection in one kind of store, and the view of it being served (swapped whole by `reload`)."""

    kind: ClassVar[str]

    def __init__(self, embedder: Embedder, name: str) -> None:
        self.embedder = embedder
        self.name = check_collection_name(name)
        self._store: StoreView | None = None
        self.load_error: str | None = None
        self.unavailable = False  # the last load failed because the store could not be reached
        # One load at a time, each reading the live content when it starts: the last to run serves the newest
        # (two loads racing could otherwise put an older version back after a newer one).
        self._loading = threading.Lock()

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the collection is, for messages and /health (a folder, or a URI without credentials)."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether the collection holds content (a version, or a collection in the database)."""

    @abstractmethod
    def read(self, check_embedder: bool = True) -> StoreView | None:
        """The live content read now; None when the collection holds none yet. VectorStoreError when it cannot be
        read, or (`check_embedder`) when it was made with another embedding model than this store's embedder."""

    @abstractmethod
    def writing(self) -> AbstractContextManager[None]:
        """Held by a writer from reading the content it changes to applying the change: one writer at a time,
        a second one gets ConflictError at once instead of waiting."""

    @abstractmethod
    def apply(
        self, previous: StoreView | None, documents: list[NewDocument], removed: Collection[str], *,
        replace: bool = False,
    ) -> str:
        """Make the content `previous` (what the writer read under `writing()`; None: nothing) without the
        documents in `removed` or named like one of `documents`, plus `documents`; with `replace`, `documents`
        only, whatever the collection holds (a rebuild). Return the version now live ("" where none are kept)."""

    def absent_view(self) -> StoreView | None:
        """What to serve while the collection holds nothing yet; None: nothing (the collection cannot serve)."""
        return None

    def purge_kept_versions(self, source: str, sha256: str) -> list[str]:
        """Take document `source` with content `sha256` out of the versions kept for rollback (the live one no longer
        holds it); return the versions rewritten. Called under `writing()`. A store that keeps no versions holds
        nothing to purge."""
        return []

    @property
    def store(self) -> StoreView | None:
        return self._store

    def reload(self) -> StoreView | None:
        """Read the live content and serve it; on failure keep serving the last good view and return None
        (`load_error` says why)."""
        with self._loading:
            try:
                store = self.read() or self.absent_view()
                if store is None:
                    raise VectorStoreError(
                        f"collection {self.name} holds no documents yet: build it with "
                        "`python scripts/ingest.py --source <folder>` or upload documents (POST /documents)"
                    )
                size = store.size
            except VectorStoreError as error:
                if error.message != self.load_error:  # once, not at every request that finds it still missing
                    logger.error("vector store not loaded: %s", error.message)
                self.load_error, self.unavailable = error.message, isinstance(error, StoreUnavailableError)
                return None
            self._store, self.load_error, self.unavailable = store, None, False
            logger.info("collection %s loaded from %s: %d chunks %s", self.name, self.kind, size, store.version)
            return store

    def serve_live_version(self) -> StoreView:
        """Serve the content just written (a rebuild, a rollback, a document change); VectorStoreError when it
        cannot be read, saying which version still serves."""
        store = self.reload()
        if store is None:
            still = f"still serving {self._store.version or 'the last one read'}" if self._store else (
                "no version is being served"
            )
            raise VectorStoreError(f"the live version could not be loaded ({self.load_error}); {still}")
        return store


class StoreBackend(ABC):
    """The collections of one kind of store."""

    kind: ClassVar[str]
    #: other processes (replicas) write it too, so nothing is built in it at a server's start
    shared: bool = False

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store is, for messages and /health (a folder, or a URI without credentials)."""

    @abstractmethod
    def collection(self, name: str) -> CollectionStore:
        """Collection `name` (checked), whether or not it holds content yet; nothing is read."""

    @abstractmethod
    def collection_names(self) -> list[str]:
        """The collections that hold content, found in the store now (other processes may have made some)."""
