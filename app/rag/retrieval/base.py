"""The retriever interface: a question in, the chunks that best answer it out, best first.

`RAGService` knows only this. A retriever over the local store searches the version that `LiveStore` serves,
one version per search even while a rebuild swaps in the next.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from app.errors import NotFoundError, VectorStoreError
from app.rag.retrieval.live_store import LiveStore
from app.rag.vector_store import ScoreKind, SearchHit, VectorStore

#: the one collection there is for now; `search` takes the name so that more can come without a new interface
DEFAULT_COLLECTION = "default"


class Retriever(ABC):
    #: what the `score` of this retriever's hits is
    score_kind: ScoreKind

    @abstractmethod
    def search(self, query: str, k: int, collection: str = DEFAULT_COLLECTION) -> list[SearchHit]:
        """At most `k` hits for `query` in `collection`, best first."""


class StoreRetriever(Retriever):
    """A retriever over the live version of the local store; subclasses say how one version is searched."""

    def __init__(self, live: LiveStore) -> None:
        self.live = live

    def search(self, query: str, k: int, collection: str = DEFAULT_COLLECTION) -> list[SearchHit]:
        if collection != DEFAULT_COLLECTION:
            raise NotFoundError(f"no collection {collection!r}; collections: {DEFAULT_COLLECTION}")
        store = self.live.store
        if store is None:
            raise VectorStoreError(self.live.load_error or "the vector store is not loaded")
        return self.search_version(store, query, k)

    @abstractmethod
    def search_version(self, store: VectorStore, query: str, k: int) -> list[SearchHit]:
        """At most `k` hits for `query` in this one loaded version."""
