"""Dense retrieval: the question's embedding against the chunks' in FAISS (cosine similarity)."""

from __future__ import annotations

from app.rag.retrieval.base import StoreRetriever
from app.rag.stores.base import StoreView
from app.rag.vector_store import ScoreKind, SearchHit


class DenseRetriever(StoreRetriever):
    score_kind: ScoreKind = "cosine"

    def search_version(self, store: StoreView, query: str, k: int) -> list[SearchHit]:
        return store.search(self.embedder.embed([query])[0], k)
