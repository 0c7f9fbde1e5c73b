"""The retriever interface: a question in, the chunks that best answer it out, best first.

`RAGService` knows only this. A retriever over a store searches the view that the collection's
`CollectionStore` serves (a FAISS version: one version per search even while a rebuild swaps in the next).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from app.errors import VectorStoreError
from app.rag.collections import DEFAULT_COLLECTION, Collections
from app.rag.embeddings import Embedder
from app.rag.stores.base import StoreView
from app.rag.vector_store import ScoreKind, SearchHit


class Retriever(ABC):
    #: what the `score` of this retriever's hits is
    score_kind: ScoreKind

    @abstractmethod
    def search(self, query: str, k: int, collection: str = DEFAULT_COLLECTION) -> list[SearchHit]:
        """At most `k` hits for `query` in `collection`, best first."""


class StoreRetriever(Retriever):
    """A retriever over the view a collection serves; subclasses say how one view is searched."""

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
    def search_version(self, store: StoreView, query: str, k: int) -> list[SearchHit]:
        """At most `k` hits for `query` in this one view."""
