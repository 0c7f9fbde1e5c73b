"""Hybrid retrieval: dense and lexical candidates of one version, fused into one ranking (HYBRID_FUSION).

The embedder knows English well and Chinese poorly, BM25 matches words in any script: fused, each covers the
other's misses. Three fusions, by name:

- `calibrated` (the default): each side's score on a scale that means the same for every question, summed:
  the cosine as it is (1 = the same meaning), and BM25 divided by the best BM25 the question's words could
  reach (1 = a chunk holding all of them as well as any chunk does; words no chunk holds count against it),
  weighted by HYBRID_LEXICAL_WEIGHT. A chunk that is not a candidate of one side gets that side's weakest
  candidate's score (cosine) or 0 (BM25). A Chinese question that meets its chunk's words wins over dense
  scores lying close together; an English question whose main words are missing from the text (paraphrased)
  does not let one shared common word outweigh a clear dense match.
- `relative`: each side's scores scaled to 0..1 over its candidates (1 = its best; 0 = its weakest candidate for
  cosine, a BM25 of 0 for BM25) and summed. Its scale differs per question: a single weak BM25 match scales to
  1 like a perfect one (on bench/data's English set, one question lower than dense alone).
- `rrf`: reciprocal rank fusion, sum(1 / (RRF_K + rank)) over the lists a chunk is in. It needs no scores at
  all, but it weighs a near-random dense rank 1 as much as a clear BM25 rank 1 (docs/performance.md, section 9).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from app.config import SettingsError
from app.rag.collections import Collections
from app.rag.retrieval.base import StoreRetriever
from app.rag.retrieval.dense import DenseRetriever
from app.rag.retrieval.lexical import LexicalRetriever
from app.rag.stores.base import StoreView
from app.rag.vector_store import ScoreKind, SearchHit


@dataclass(frozen=True)
class Ranking:
    hits: list[SearchHit]  # best first, all of one version
    floor: float | None  # the score of no match at all (BM25: 0); None: none, the weakest candidate stands for it
    ceiling: float = 1.0  # the best score the question could get (cosine: 1; BM25: `LexicalIndex.best_possible`)
    weight: float = 1.0  # this side's weight in calibrated fusion

    @property
    def absent(self) -> float:
        """The score of a chunk that is not among the candidates."""
        if self.floor is not None:
            return self.floor
        return self.hits[-1].score if self.hits else 0.0


#: points per hit of a ranking (best first), and the points of a chunk that ranking does not hold
Points = tuple[list[float], float]


def calibrated_fusion(rankings: list[Ranking], rrf_k: int) -> list[SearchHit]:
    def calibrated(ranking: Ranking) -> Points:
        scale = ranking.weight / ranking.ceiling if ranking.ceiling > 0 else 0.0
        return [hit.score * scale for hit in ranking.hits], ranking.absent * scale

    return _ranked(rankings, calibrated, "calibrated")


def reciprocal_rank_fusion(rankings: list[Ranking], rrf_k: int) -> list[SearchHit]:
    return _ranked(
        rankings, lambda ranking: ([1.0 / (rrf_k + rank) for rank in range(1, len(ranking.hits) + 1)], 0.0), "rrf"
    )


def relative_score_fusion(rankings: list[Ranking], rrf_k: int) -> list[SearchHit]:
    def scaled(ranking: Ranking) -> Points:
        if not ranking.hits:
            return [], 0.0
        best, floor = ranking.hits[0].score, ranking.absent
        return [(hit.score - floor) / (best - floor) if best > floor else 1.0 for hit in ranking.hits], 0.0

    return _ranked(rankings, scaled, "relative")


def _ranked(rankings: list[Ranking], points: Callable[[Ranking], Points], kind: ScoreKind) -> list[SearchHit]:
    """Chunks by the sum of their points over the rankings, best first; ties keep the order of first appearance."""
    first: dict[int, SearchHit] = {}
    for ranking in rankings:
        for hit in ranking.hits:
            first.setdefault(hit.chunk_id, hit)
    fused = dict.fromkeys(first, 0.0)
    for ranking in rankings:
        values, absent = points(ranking)
        held = {hit.chunk_id: value for hit, value in zip(ranking.hits, values, strict=True)}
        for chunk_id in fused:
            fused[chunk_id] += held.get(chunk_id, absent)
    order = sorted(fused, key=fused.__getitem__, reverse=True)  # sorted is stable
    return [SearchHit(i, first[i].chunk, fused[i], kind) for i in order]


Fusion = Callable[[list[Ranking], int], list[SearchHit]]
#: HYBRID_FUSION names: the function and the kind of score its hits carry
FUSIONS: Mapping[str, tuple[Fusion, ScoreKind]] = {
    "calibrated": (calibrated_fusion, "calibrated"),
    "relative": (relative_score_fusion, "relative"),
    "rrf": (reciprocal_rank_fusion, "rrf"),
}


class HybridRetriever(StoreRetriever):
    def __init__(
        self, collections: Collections, fusion: str, rrf_k: int, candidates: int, lexical_weight: float = 2.0
    ) -> None:
        super().__init__(collections)
        if fusion not in FUSIONS:
            raise SettingsError(f"HYBRID_FUSION={fusion!r} is invalid: allowed: {', '.join(sorted(FUSIONS))}")
        self._fuse, self.score_kind = FUSIONS[fusion]
        self._dense, self._lexical = DenseRetriever(collections), LexicalRetriever(collections)
        self._rrf_k = rrf_k
        self._candidates = candidates
        self._lexical_weight = lexical_weight

    def search_version(self, store: StoreView, query: str, k: int) -> list[SearchHit]:
        depth = max(k, self._candidates)
        rankings = [
            Ranking(self._dense.search_version(store, query, depth), floor=None),
            Ranking(self._lexical.search_version(store, query, depth), floor=0.0,
                    ceiling=store.best_lexical_score(query), weight=self._lexical_weight),
        ]
        return self._fuse(rankings, self._rrf_k)[:k]
