"""The retriever interface: a question in, the chunks that best answer it out, best first.

`RAGService` knows only this. A retriever over the local store searches the version that the collection's
`LiveStore` serves, one version per search even while a rebuild swaps in the next.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from app.errors import VectorStoreError
from app.rag.collections import DEFAULT_COLLECTION, Collections
from app.rag.embeddings import Embedder
from app.rag.vector_store import ScoreKind, SearchHit, VectorStore


class Retriever(ABC):
    #: what the `score` of this retriever's hits is
    score_kind: ScoreKind

    @abstractmethod
    def search(self, query: str, k: int, collection: str = DEFAULT_COLLECTION) -> list[SearchHit]:
        """At most `k` hits for `query` in `collection`, best first."""


class StoreRetriever(Retriever):
    """A retriever over the live version of a collection's local store; subclasses say how one version is
    searched."""

    def __init__(self, collections: Collections) -> None:
        self.collections = collections

    @property
    def embedder(self) -> Embedder:
        return self.collections.embedder

    def search(self, query: str, k: int, collection: str = DEFAULT_COLLECTION) -> list[SearchHit]:
        live = self.collections.live(collection)
        store = live.store
        if store is None:
            raise VectorStoreError(live.load_error or "the vector store is not loaded")
        return self.search_version(store, query, k)

    @abstractmethod
    def search_version(self, store: VectorStore, query: str, k: int) -> list[SearchHit]:
        """At most `k` hits for `query` in this one loaded version."""
