"""The fast paths of retrieval and ingestion keep what users get: a large store (8-bit scan + exact re-ranking)
returns the exact top-4 with exact scores and its stored vectors, stores written with a flat index still load,
searching leaves torch's thread count alone, and the bfloat16 embedder (the default on CPUs that have bfloat16)
gives the float32 vectors' neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import Settings
from app.rag.embeddings import Embedder, create_embedder
from app.rag.vector_store import (
    APPROXIMATE_MIN_CHUNKS,
    StoredChunk,
    VectorStore,
    build_index,
    load_store,
    write_store,
)

DIMENSION = 384


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _chunks(count: int) -> list[StoredChunk]:
    return [StoredChunk(text=f"chunk {i}", metadata={"source": "t", "chunk_index": i}) for i in range(count)]


def test_large_store_gives_the_exact_top4_scores_and_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    count = APPROXIMATE_MIN_CHUNKS + 5_000
    vectors = _unit(rng.standard_normal((count, DIMENSION), dtype=np.float32))
    # Queries like real ones (a paraphrase near a stored chunk) and unrelated ones (neighbours far and close).
    near = vectors[rng.integers(0, count, 100)] + 0.08 * rng.standard_normal((100, DIMENSION), dtype=np.float32)
    queries = _unit(np.concatenate([near, rng.standard_normal((100, DIMENSION), dtype=np.float32)]))
    write_store(tmp_path, VectorStore(build_index(vectors, DIMENSION), _chunks(count), {}, "test-model"))
    store = load_store(tmp_path, expected_embedding_model="test-model")

    exact = queries @ vectors.T
    same = 0
    for query, scores in zip(queries, exact, strict=True):
        hits = store.search(query, 4)
        expected = np.argsort(-scores)[:4]
        same += [hit.chunk.metadata["chunk_index"] for hit in hits] == expected.tolist()
        np.testing.assert_allclose([hit.score for hit in hits], scores[[h.chunk.metadata["chunk_index"] for h in hits]],
                                   atol=1e-5)
    assert same >= 0.99 * len(queries)
    # Incremental ingestion keeps unchanged files' vectors: they must come back as they were stored.
    np.testing.assert_array_equal(store.vectors([0, 17, count - 1]), vectors[[0, 17, count - 1]])


def test_store_written_with_a_flat_index_still_loads(tmp_path: Path) -> None:
    import faiss

    rng = np.random.default_rng(2)
    vectors = _unit(rng.standard_normal((50, DIMENSION), dtype=np.float32))
    flat = faiss.IndexFlatIP(DIMENSION)
    flat.add(vectors)
    write_store(tmp_path, VectorStore(flat, _chunks(50), {}, "test-model"))
    store = load_store(tmp_path)
    assert store.search(vectors[7], 1)[0].chunk.metadata["chunk_index"] == 7
    np.testing.assert_array_equal(store.vectors([3]), vectors[[3]])


def test_loading_and_searching_leave_torch_threads_alone(tmp_path: Path) -> None:
    """A search runs on one OpenMP thread, but embedding after it (incremental ingestion, the next query)
    must keep all of torch's threads: the thread count was once left at 1 by loading a store."""
    vectors = _unit(np.random.default_rng(3).standard_normal((10, DIMENSION), dtype=np.float32))
    write_store(tmp_path, VectorStore(build_index(vectors, DIMENSION), _chunks(10), {}, "test-model"))
    before = torch.get_num_threads()
    load_store(tmp_path).search(vectors[0], 4)
    assert torch.get_num_threads() == before


ENGLISH = [
    "A flat tyre is repaired within one hour for a fee of nine euros.",
    "The ferry to the island leaves every morning at seven, weather permitting.",
    "Apple trees in the orchard are pruned in late winter before the buds open.",
    "How long does it take to fix a punctured bicycle tyre?",
    "Vector search finds the chunks whose embeddings are closest to the question.",
]
CHINESE = [
    "云雾茶园位于海拔一千二百米的山坡上。",
    "游客可以在周三参观茶园，参观费用是每人二十元。",
    "每年清明节前采摘的春茶品质最好。",
    "茶园有多少名采茶工人？",
]
QUESTIONS = [
    "How much does a flat tyre repair cost?",
    "What kind of brake cables does the workshop use?",
    "When does the workshop close on Saturdays?",
    "When does the ferry leave?",
    "When are the apple trees pruned?",
    "茶园在海拔多高的地方？",
    "参观茶园要多少钱？",
    "采茶工人几点开始工作？",
]


@pytest.fixture(scope="module")
def float_embedder() -> Embedder:
    return create_embedder(Settings(_env_file=None, embedding_dtype="float32"))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def bfloat16_embedder() -> Embedder:
    return create_embedder(Settings(_env_file=None, embedding_dtype="bfloat16"))  # type: ignore[call-arg]


@pytest.mark.numerics
def test_bfloat16_embedder_keeps_the_float_vectors(bfloat16_embedder: Embedder, float_embedder: Embedder) -> None:
    texts = ENGLISH + CHINESE
    fast, reference = bfloat16_embedder.embed(texts), float_embedder.embed(texts)
    assert fast.dtype == np.float32
    cosines = np.sum(fast * reference, axis=1)
    assert cosines.min() >= 0.99, dict(zip(texts, cosines.round(4), strict=True))
    assert not np.array_equal(fast, reference)  # it really is another path


def test_default_embedder_is_the_configured_one(embedder: Embedder) -> None:
    """The suite's embedder (which built the corpus store) and the server's come from the same defaults."""
    assert Settings(_env_file=None).embedding_dtype == "auto"  # type: ignore[call-arg]
    default = create_embedder(Settings(_env_file=None))  # type: ignore[call-arg]
    np.testing.assert_array_equal(embedder.embed(ENGLISH), default.embed(ENGLISH))


@pytest.mark.numerics
def test_bfloat16_embedder_retrieves_the_same_top_chunk_wherever_float32_has_a_clear_winner(
    corpus_store: Path, bfloat16_embedder: Embedder, float_embedder: Embedder
) -> None:
    """Where float32's best chunk beats its second by more than bfloat16's rounding can move a cosine (0.02:
    the vectors keep a cosine of 0.99 or more), bfloat16 ranks the same chunk first, on every CPU kind."""
    texts = [chunk.text for chunk in load_store(corpus_store).chunks]
    float_scores = float_embedder.embed(QUESTIONS) @ float_embedder.embed(texts).T
    fast_top = np.argmax(bfloat16_embedder.embed(QUESTIONS) @ bfloat16_embedder.embed(texts).T, axis=1)
    best_two = np.sort(float_scores, axis=1)[:, -2:]
    clear = best_two[:, 1] - best_two[:, 0] > 0.02
    assert clear.sum() >= len(QUESTIONS) // 2, "too few clear questions to tell anything"
    float_top = np.argmax(float_scores, axis=1)
    differences = [(q, texts[a][:60], texts[b][:60])
                   for q, a, b, c in zip(QUESTIONS, fast_top, float_top, clear, strict=True) if c and a != b]
    assert not differences, differences
