"""The lexical (BM25) index of one store version, beside its FAISS index.

bm25s computes every (term, chunk) score at build time into a sparse matrix, so a search only adds up the
posting lists of the query's terms. It is written here as `lexical.npz` (the three arrays of that matrix, read
back with `allow_pickle=False`) and `lexical.json` (the vocabulary, BM25 parameters and the tokenizer's name),
both checksummed in the version's manifest like the other files. bm25s's own `save` writes no pickle either,
but it spreads the index over five files and does not fsync them, and the store must be whole before it is named.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.rag.retrieval.tokenize import TOKENIZER_NAME, tokenize

ARRAYS_FILE = "lexical.npz"
VOCABULARY_FILE = "lexical.json"
# bm25s's defaults (Lucene's variant of BM25): k1 saturates repeated terms, b normalises for chunk length.
K1, B, METHOD = 1.5, 0.75, "lucene"
_ARRAYS = ("data", "indices", "indptr")


class LexicalIndexError(ValueError):
    """The two files do not make a usable index (the store loader turns this into VectorStoreError)."""


@dataclass(frozen=True)
class LexicalIndex:
    """BM25 over the chunks of one version, chunk ids as in the docstore."""

    model: Any  # bm25s.BM25 with its scores and vocabulary set

    @property
    def size(self) -> int:
        return int(self.model.scores["num_docs"])

    @classmethod
    def build(cls, texts: Sequence[str]) -> LexicalIndex:
        import bm25s

        model = bm25s.BM25(k1=K1, b=B, method=METHOD)
        with warnings.catch_warnings():  # an empty store has no mean chunk length, which numpy warns about
            warnings.simplefilter("ignore", RuntimeWarning)
            scores, vocabulary = model.build_index_from_tokens([tokenize(t) for t in texts], show_progress=False)
        return cls(_ready(model, scores, vocabulary))

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The `k` best (chunk id, BM25 score) pairs, best first; chunks sharing no term with `query` never."""
        # Each word of the question counts once, as in `best_possible` (Chinese segmentation repeats words).
        term_ids = list(dict.fromkeys(self.model.get_tokens_ids(tokenize(query))))
        if not term_ids or self.size == 0:
            return []
        scores = self.model.get_scores_from_ids(term_ids)
        k = min(k, self.size)
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(int(i), float(scores[i])) for i in best if scores[i] > 0]

    def best_possible(self, query: str) -> float:
        """The BM25 score a chunk would get for `query` if it held each of its words as well as the best chunk
        does: the scale calibrated fusion divides by. A word no chunk holds counts as much as the rarest word
        can, once (its IDF at one occurrence in a chunk of average length), so a question whose main words are
        all missing is not scored as a full match on the one common word it shares."""
        terms = set(tokenize(query))
        known = set(self.model.get_tokens_ids(list(terms)))
        scores = self.model.scores
        data, indptr = scores["data"], scores["indptr"]
        best = sum(float(data[indptr[t] : indptr[t + 1]].max()) for t in known if indptr[t + 1] > indptr[t])
        rarest = float(np.log(1 + (self.size + 0.5) / 0.5))  # Lucene's IDF of a word in no chunk
        return best + rarest * (len(terms) - len(known))

    def arrays_bytes(self) -> bytes:
        buffer = io.BytesIO()
        scores = self.model.scores
        np.savez(buffer, data=scores["data"], indices=scores["indices"], indptr=scores["indptr"])
        return buffer.getvalue()

    def vocabulary_bytes(self) -> bytes:
        vocabulary = sorted(self.model.vocab_dict, key=self.model.vocab_dict.__getitem__)  # term id order
        payload = {"tokenizer": TOKENIZER_NAME, "k1": K1, "b": B, "method": METHOD, "num_docs": self.size,
                   "vocabulary": vocabulary}
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")

    @classmethod
    def read(cls, arrays_path: Path, vocabulary_path: Path) -> LexicalIndex:
        """Load the two files, checking that they fit together; LexicalIndexError saying why not."""
        import bm25s

        payload = json.loads(vocabulary_path.read_text(encoding="utf-8"))
        if payload.get("tokenizer") != TOKENIZER_NAME:
            raise LexicalIndexError(f"it was tokenised by {payload.get('tokenizer')!r}, not {TOKENIZER_NAME!r}")
        vocabulary = [str(term) for term in payload["vocabulary"]]
        num_docs = int(payload["num_docs"])
        with np.load(arrays_path, allow_pickle=False) as stored:
            data, indices, indptr = (np.ascontiguousarray(stored[name]) for name in _ARRAYS)
        if not _fits(data, indices, indptr, len(vocabulary), num_docs):
            raise LexicalIndexError("its arrays do not fit its vocabulary")
        model = bm25s.BM25(k1=float(payload["k1"]), b=float(payload["b"]), method=str(payload["method"]))
        scores = {"data": data, "indices": indices, "indptr": indptr, "num_docs": num_docs}
        return cls(_ready(model, scores, {term: number for number, term in enumerate(vocabulary)}))


def _ready(model: Any, scores: dict[str, Any], vocabulary: dict[str, int]) -> Any:
    """`model` with what bm25s's `index` would have set: the scores, the vocabulary, and no non-occurrence
    scores (only BM25L and BM25+ have them, not Lucene's BM25)."""
    model.scores, model.vocab_dict, model.nonoccurrence_array = scores, vocabulary, None
    return model


def _fits(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, terms: int, num_docs: int) -> bool:
    """A CSC matrix of `terms` columns over `num_docs` chunks: a search would index out of bounds otherwise."""
    if data.dtype != np.float32 or indices.dtype.kind != "i" or indptr.dtype.kind != "i":
        return False
    if len(indptr) != terms + 1 or indptr[0] != 0 or not len(data) == len(indices) == indptr[-1]:
        return False
    if np.any(np.diff(indptr) < 0) or not np.isfinite(data).all():
        return False
    return not len(indices) or (0 <= int(indices.min()) and int(indices.max()) < num_docs)
