"""Lexical retrieval: BM25 over the words of the question (Chinese segmented by jieba, see `tokenize`)."""

from __future__ import annotations

from app.rag.retrieval.base import StoreRetriever
from app.rag.stores.base import StoreView
from app.rag.vector_store import ScoreKind, SearchHit


class LexicalRetriever(StoreRetriever):
    score_kind: ScoreKind = "bm25"

    def search_version(self, store: StoreView, query: str, k: int) -> list[SearchHit]:
        return store.search_lexical(query, k)
