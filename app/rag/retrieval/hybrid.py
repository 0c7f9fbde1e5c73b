"""Hybrid retrieval: dense and lexical candidates of one version, fused into one ranking (HYBRID_FUSION).

The embedder knows English well and Chinese poorly, BM25 matches words in any script: fused, each covers the
other's misses. Two fusions, by name:

- `relative` (the default): each side's scores scaled to 0..1 over its candidates (1 = its best; 0 = its
  weakest candidate for cosine, a BM25 of 0 for BM25) and summed. It keeps the margins: when BM25's best is far
  ahead and the dense scores lie close together, as for a Chinese question and an English-only embedder, BM25's
  choice wins. On bench/data's Chinese set it ranks the right file first for 12 of 12 questions, RRF for 8.
- `rrf`: reciprocal rank fusion, sum(1 / (RRF_K + rank)) over the lists a chunk is in. It needs no scores at
  all, but it weighs a near-random dense rank 1 as much as a clear BM25 rank 1 (docs/performance.md, section 9).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from app.config import SettingsError
from app.rag.retrieval.base import StoreRetriever
from app.rag.retrieval.dense import DenseRetriever
from app.rag.retrieval.lexical import LexicalRetriever
from app.rag.retrieval.live_store import LiveStore
from app.rag.vector_store import ScoreKind, SearchHit, VectorStore


@dataclass(frozen=True)
class Ranking:
    hits: list[SearchHit]  # best first, all of one version
    floor: float | None  # the score of no match at all (BM25: 0); None: none, the weakest candidate stands for it


def reciprocal_rank_fusion(rankings: list[Ranking], rrf_k: int) -> list[SearchHit]:
    return _ranked(rankings, lambda ranking: [1.0 / (rrf_k + rank) for rank in range(1, len(ranking.hits) + 1)],
                   "rrf")


def relative_score_fusion(rankings: list[Ranking], rrf_k: int) -> list[SearchHit]:
    def scaled(ranking: Ranking) -> list[float]:
        if not ranking.hits:
            return []
        best = ranking.hits[0].score
        floor = ranking.hits[-1].score if ranking.floor is None else ranking.floor
        return [(hit.score - floor) / (best - floor) if best > floor else 1.0 for hit in ranking.hits]

    return _ranked(rankings, scaled, "relative")


def _ranked(rankings: list[Ranking], points: Callable[[Ranking], list[float]], kind: ScoreKind) -> list[SearchHit]:
    """Chunks by the sum of their points over the rankings, best first; ties keep the order of first appearance."""
    fused: dict[int, float] = {}
    first: dict[int, SearchHit] = {}
    for ranking in rankings:
        for hit, value in zip(ranking.hits, points(ranking), strict=True):
            fused[hit.chunk_id] = fused.get(hit.chunk_id, 0.0) + value
            first.setdefault(hit.chunk_id, hit)
    order = sorted(fused, key=fused.__getitem__, reverse=True)  # sorted is stable
    return [SearchHit(i, first[i].chunk, fused[i], kind) for i in order]


Fusion = Callable[[list[Ranking], int], list[SearchHit]]
#: HYBRID_FUSION names: the function and the kind of score its hits carry
FUSIONS: Mapping[str, tuple[Fusion, ScoreKind]] = {
    "relative": (relative_score_fusion, "relative"),
    "rrf": (reciprocal_rank_fusion, "rrf"),
}


class HybridRetriever(StoreRetriever):
    def __init__(self, live: LiveStore, fusion: str, rrf_k: int, candidates: int) -> None:
        super().__init__(live)
        if fusion not in FUSIONS:
            raise SettingsError(f"HYBRID_FUSION={fusion!r} is invalid: allowed: {', '.join(sorted(FUSIONS))}")
        self._fuse, self.score_kind = FUSIONS[fusion]
        self._dense, self._lexical = DenseRetriever(live), LexicalRetriever(live)
        self._rrf_k = rrf_k
        self._candidates = candidates

    def search_version(self, store: VectorStore, query: str, k: int) -> list[SearchHit]:
        depth = max(k, self._candidates)
        rankings = [
            Ranking(self._dense.search_version(store, query, depth), floor=None),
            Ranking(self._lexical.search_version(store, query, depth), floor=0.0),
        ]
        return self._fuse(rankings, self._rrf_k)[:k]
