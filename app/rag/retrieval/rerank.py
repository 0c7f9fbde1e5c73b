"""Optional re-ranking (RERANKER_MODEL): a cross-encoder reads the question and each candidate chunk together
and re-orders the candidates of another retriever by its relevance score.

A cross-encoder sees both texts at once, so it judges relevance better than comparing two separate embeddings
or counting shared words, but it costs one model pass per candidate: it re-orders RERANKER_CANDIDATES
candidates, never the whole store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.errors import ModelLoadError
from app.rag.collections import DEFAULT_COLLECTION
from app.rag.retrieval.base import Retriever
from app.rag.vector_store import ScoreKind, SearchHit


def load_cross_encoder(name: str, cache_dir: Path | None) -> Any:
    """A sentence-transformers CrossEncoder from a local folder, or a hub id already in the cache: nothing is
    downloaded at run time (`local_files_only`)."""
    from sentence_transformers import CrossEncoder

    try:
        cross_encoder = CrossEncoder(
            name, device="cpu", cache_folder=str(cache_dir) if cache_dir else None, local_files_only=True,
            trust_remote_code=False,
        )
    except Exception as error:  # a damaged weights file raises SafetensorError, not OSError: one line, no traceback
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelLoadError(f"cannot load RERANKER_MODEL={name!r} (a local folder, or a hub id in the cache): "
                             f"{type(error).__name__}: {detail}") from None
    # A model with several labels (an NLI model, say) gives each pair a row of scores, not one relevance score:
    # refused here rather than failing every question.
    if cross_encoder.num_labels != 1:
        raise ModelLoadError(f"RERANKER_MODEL={name!r} gives {cross_encoder.num_labels} scores per pair: a "
                             "re-ranker gives one (a cross-encoder with num_labels=1)")
    return cross_encoder


class RerankingRetriever(Retriever):
    score_kind: ScoreKind = "cross_encoder"

    def __init__(self, inner: Retriever, cross_encoder: Any, candidates: int) -> None:
        self._inner = inner
        self._cross_encoder = cross_encoder
        self._candidates = candidates

    def search(self, query: str, k: int, collection: str = DEFAULT_COLLECTION) -> list[SearchHit]:
        candidates = self._inner.search(query, max(k, self._candidates), collection)
        if not candidates:
            return []
        scores = self._cross_encoder.predict([(query, hit.chunk.text) for hit in candidates], show_progress_bar=False)
        ranked = sorted(zip(candidates, scores, strict=True), key=lambda pair: float(pair[1]), reverse=True)
        return [SearchHit(hit.chunk_id, hit.chunk, float(score), "cross_encoder") for hit, score in ranked[:k]]
