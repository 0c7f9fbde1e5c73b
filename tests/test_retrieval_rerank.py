"""The optional re-ranker (RERANKER_MODEL) with a real cross-encoder over a real ingested store.

No re-ranker ships offline, so each test builds one: a tiny BERT sequence classifier with random weights and the
embedded MiniLM's tokenizer, saved to a folder and loaded from there by sentence-transformers as any
RERANKER_MODEL folder is. Its scores mean nothing, so what is checked is the mechanics: the hits are the inner
retriever's candidates in the order of the cross-encoder's own scores.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from sentence_transformers import CrossEncoder
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from app.config import EMBEDDED_EMBEDDING_MODEL
from app.errors import ModelLoadError
from app.llm.model_source import resolve_embedding_model
from app.main import build_rag_service
from app.rag.collections import Collections
from app.rag.embeddings import Embedder
from app.rag.retrieval.registry import create_retriever
from app.rag.retrieval.rerank import RerankingRetriever
from app.rag.stores.faiss_store import FaissBackend
from tests.conftest import make_settings

QUESTIONS = (
    "How much does a flat tyre repair cost?",
    "When does the apple harvest start?",
    "When does the last ferry leave?",
    "茶园几点开门？",
)
CANDIDATES = 3


def tiny_cross_encoder(folder: Path, num_labels: int = 1) -> Path:
    """A BERT cross-encoder of one 16-wide layer (a few hundred kB, the tokenizer's embeddings most of it)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_embedding_model(EMBEDDED_EMBEDDING_MODEL))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
        initializer_range=0.5,  # BERT's 0.02 scores every pair within 1e-6 of the others: ties decide the order
    )
    config.num_labels = num_labels
    with torch.random.fork_rng():  # the same weights every run, and other tests' random state left alone
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class PairCountingCrossEncoder(CrossEncoder):
    """A real CrossEncoder that also records how many (question, chunk) pairs each `predict` scored."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), device="cpu")
        self.pairs_scored: list[int] = []

    def predict(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        self.pairs_scored.append(len(inputs))
        return super().predict(inputs, *args, **kwargs)


@pytest.fixture(scope="module")
def reranker_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cross_encoder(tmp_path_factory.mktemp("reranker") / "tiny")


@pytest.fixture(scope="module")
def live(corpus_store: Path, embedder: Embedder) -> Collections:
    live = Collections(FaissBackend(embedder, corpus_store))
    live.reload_all()
    assert live.default.store is not None, live.default.load_error
    return live


def test_with_reranker_model_set_hits_are_the_candidates_in_the_cross_encoders_order(
    live: Collections, reranker_folder: Path, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, reranker_model=str(reranker_folder), reranker_candidates=CANDIDATES)
    reranked = create_retriever(settings, live)
    inner = create_retriever(make_settings(tmp_path), live)  # hybrid, the default mode, not re-ranked
    judge = CrossEncoder(str(reranker_folder), device="cpu")
    assert isinstance(reranked, RerankingRetriever) and reranked.score_kind == "cross_encoder"

    reordered = 0
    for question in QUESTIONS:
        candidates = inner.search(question, CANDIDATES)
        scores = [float(score) for score in judge.predict([(question, hit.chunk.text) for hit in candidates])]
        assert len(set(scores)) == len(scores), scores  # no ties: the order is the scores' alone
        score_of = dict(zip((hit.chunk_id for hit in candidates), scores, strict=True))

        hits = reranked.search(question, 2)
        assert [hit.chunk_id for hit in hits] == sorted(score_of, key=score_of.__getitem__, reverse=True)[:2]
        assert [hit.score for hit in hits] == pytest.approx([score_of[hit.chunk_id] for hit in hits])
        assert {hit.score_kind for hit in hits} == {"cross_encoder"}
        reordered += [hit.chunk_id for hit in hits] != [hit.chunk_id for hit in candidates[:2]]
    assert reordered, "the re-ranker returned every inner ranking unchanged"


def test_the_reranker_scores_at_most_reranker_candidates_unless_more_hits_are_asked_for(
    live: Collections, reranker_folder: Path, tmp_path: Path
) -> None:
    inner = create_retriever(make_settings(tmp_path), live)
    assert len(inner.search(QUESTIONS[0], 50)) > CANDIDATES + 1  # the store has more than the re-ranker reads
    cross_encoder = PairCountingCrossEncoder(reranker_folder)
    reranker = RerankingRetriever(inner, cross_encoder, CANDIDATES)

    assert len(reranker.search(QUESTIONS[0], 1)) == 1
    assert len(reranker.search(QUESTIONS[0], CANDIDATES)) == CANDIDATES
    # Every hit carries a cross-encoder score, so asking for more hits than RERANKER_CANDIDATES scores that many.
    assert len(reranker.search(QUESTIONS[0], CANDIDATES + 1)) == CANDIDATES + 1
    assert cross_encoder.pairs_scored == [CANDIDATES, CANDIDATES, CANDIDATES + 1]

    lexical = create_retriever(make_settings(tmp_path, retrieval_mode="lexical"), live)
    assert RerankingRetriever(lexical, cross_encoder, CANDIDATES).search("xylophone", 2) == []
    assert cross_encoder.pairs_scored == [CANDIDATES, CANDIDATES, CANDIDATES + 1]  # no candidates, nothing scored


def _damaged_weights(folder: Path) -> Path:
    tiny_cross_encoder(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return folder


@pytest.mark.parametrize(
    ("make_model", "message"),
    [
        (lambda tmp: tmp / "no-such-folder", "FileNotFoundError"),
        (_damaged_weights, "SafetensorError"),
        (lambda tmp: tiny_cross_encoder(tmp / "nli", num_labels=3), "gives 3 scores per pair"),
        (lambda tmp: Path("cross-encoder/not-in-the-cache"), "a hub id in the cache"),
    ],
    ids=["missing-folder", "damaged-weights", "three-labels", "hub-id-not-cached"],
)
def test_an_unloadable_reranker_model_is_a_one_line_model_load_error_naming_it(
    live: Collections, tmp_path: Path, make_model: Any, message: str
) -> None:
    name = str(make_model(tmp_path))
    # An empty CACHE_DIR: a hub id is looked up there only, and nothing is downloaded.
    settings = make_settings(tmp_path, reranker_model=name, cache_dir=tmp_path / "cache")
    with pytest.raises(ModelLoadError, match=re.escape(f"RERANKER_MODEL={name!r}")) as error:
        create_retriever(settings, live)
    assert message in error.value.message and "\n" not in error.value.message


def test_the_service_does_not_start_with_an_unloadable_reranker_model(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, reranker_model=str(tmp_path / "no-such-folder"))
    with pytest.raises(ModelLoadError, match="cannot load RERANKER_MODEL="):
        anyio.run(build_rag_service, settings, {})  # before any generation backend is loaded
