"""Retrievers by RETRIEVAL_MODE name: a new kind of retrieval is one class plus one line in RETRIEVERS."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from app.config import Settings, SettingsError
from app.rag.collections import Collections
from app.rag.retrieval.base import Retriever
from app.rag.retrieval.dense import DenseRetriever
from app.rag.retrieval.hybrid import HybridRetriever
from app.rag.retrieval.lexical import LexicalRetriever
from app.rag.retrieval.rerank import RerankingRetriever, load_cross_encoder

RetrieverFactory = Callable[[Settings, Collections], Retriever]

RETRIEVERS: Mapping[str, RetrieverFactory] = {
    "hybrid": lambda settings, collections: HybridRetriever(
        collections, settings.hybrid_fusion, settings.rrf_k, settings.retrieval_candidates,
        settings.hybrid_lexical_weight,
    ),
    "dense": lambda settings, collections: DenseRetriever(collections),
    "lexical": lambda settings, collections: LexicalRetriever(collections),
}


def create_retriever(settings: Settings, collections: Collections) -> Retriever:
    """The retriever RETRIEVAL_MODE names, re-ranked by RERANKER_MODEL when that is set."""
    factory = RETRIEVERS.get(settings.retrieval_mode)
    if factory is None:
        raise SettingsError(
            f"RETRIEVAL_MODE={settings.retrieval_mode!r} is invalid: allowed: {', '.join(sorted(RETRIEVERS))}"
        )
    retriever = factory(settings, collections)
    if not settings.reranker_model:
        return retriever
    cross_encoder = load_cross_encoder(settings.reranker_model, settings.cache_dir)
    return RerankingRetriever(retriever, cross_encoder, settings.reranker_candidates)
