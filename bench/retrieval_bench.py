"""5. top-4 search latency through the store the server loads (write_store + load_store + VectorStore.search),
and through each RETRIEVAL_MODE's retriever (dense, lexical, hybrid) on chunks of words;
6. ingestion throughput of ingest_folder with the real embedded MiniLM embedder (FAISS + lexical index built)."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

from app.rag.embeddings import Embedder
from bench.common import Context, Row, SectionResult, distribution, ms, verdict

DIMENSION = 384
TOP_K = 4


VOCABULARY = 20_000  # distinct words of the generated chunks, drawn Zipf-like as in real text
WORDS_PER_CHUNK = 70  # about a 500-character chunk


def _texts(count: int, rng: np.random.Generator) -> list[str]:
    ranks = np.minimum(rng.zipf(1.2, size=(count, WORDS_PER_CHUNK)), VOCABULARY)
    return [" ".join(f"w{rank}" for rank in row) for row in ranks]


class _PreparedEmbedder(Embedder):
    """The bench's query vectors by query text: section 5 times search, not MiniLM (timed in section 6)."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.name = "bench-random"
        self._vectors = vectors

    def embed(self, texts: Any) -> np.ndarray:
        return np.stack([self._vectors[text] for text in texts])


def _store_of(ctx: Context, count: int, rng: np.random.Generator) -> Any:
    """A store of `count` random unit vectors and chunks of words, written and loaded as the server does."""
    from app.rag.vector_store import StoredChunk, VectorStore, build_index, load_store, write_store

    vectors = rng.standard_normal((count, DIMENSION), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [StoredChunk(text=text, metadata={"source": "bench", "chunk_index": i})
              for i, text in enumerate(_texts(count, rng))]
    folder = ctx.scratch / f"store-{count}"
    write_store(folder, VectorStore(build_index(vectors, DIMENSION), chunks, {}, "bench-random"))
    return load_store(folder)


def retrieval(ctx: Context) -> SectionResult:
    queries = ctx.size(500, 60)
    rng = np.random.default_rng(0)
    data: dict[str, Any] = {"dimension": DIMENSION, "top_k": TOP_K, "queries": queries}
    rows = []
    for count in (2_000, 100_000):
        store = _store_of(ctx, count, rng)
        probes = rng.standard_normal((queries, DIMENSION), dtype=np.float32)
        probes /= np.linalg.norm(probes, axis=1, keepdims=True)
        for probe in probes[:5]:  # warm-up
            store.search(probe, TOP_K)
        seconds = []
        for probe in probes:
            started = time.perf_counter()
            hits = store.search(probe, TOP_K)
            seconds.append(time.perf_counter() - started)
            assert len(hits) == TOP_K
        stats = distribution(seconds)
        from app.rag.vector_store import APPROXIMATE_MIN_CHUNKS

        # As served: exact float vectors below APPROXIMATE_MIN_CHUNKS, above it 8-bit codes re-ranked exactly.
        coded = count >= APPROXIMATE_MIN_CHUNKS
        scanned_mb = count * DIMENSION * (1 if coded else 4) / 1e6
        stats["scan_gb_per_s_at_p50"] = scanned_mb / 1e3 / stats["p50"]
        data[str(count)] = stats
        target = count == 100_000
        kind = "8-bit codes + exact re-rank" if coded else "exact (flat)"
        note = (f"{kind} on 1 thread, as served: scans {scanned_mb:.0f} MB per query, "
                f"{stats['scan_gb_per_s_at_p50']:.1f} GB/s at p50; {queries} queries")
        rows.append(Row("5", f"top-{TOP_K} search, {count:,} chunks x {DIMENSION}-d: p50 / p99",
                        f"{ms(stats['p50'])} / {ms(stats['p99'])}", "p50 <= 10 ms" if target else "",
                        verdict(stats["p50"] <= 0.010) if target else "", note))
        rows.extend(_modes(ctx, store, count, rng, probes, data))
        del store
    return SectionResult(5, "Retrieval", data, rows)


def _modes(ctx: Context, store: Any, count: int, rng: np.random.Generator, probes: np.ndarray,
           data: dict[str, Any]) -> list[Row]:
    """Each RETRIEVAL_MODE's `search` on the loaded store, query embedding excluded (prepared vectors)."""
    from app.config import Settings
    from app.rag.collections import Collections
    from app.rag.retrieval.registry import RETRIEVERS
    from app.rag.stores.faiss_store import FaissBackend

    # A question's handful of words, drawn like the chunks' words.
    queries = [" ".join(text.split()[:6]) for text in _texts(len(probes), rng)]
    embedder = _PreparedEmbedder(dict(zip(queries, probes, strict=True)))
    collections = Collections(FaissBackend(embedder, ctx.scratch / f"store-{count}"))
    collections.reload_all()
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    rows = []
    for mode, factory in sorted(RETRIEVERS.items()):
        retriever = factory(settings, collections)
        for query in queries[:5]:  # warm-up
            retriever.search(query, TOP_K)
        seconds = []
        for query in queries:
            started = time.perf_counter()
            retriever.search(query, TOP_K)
            seconds.append(time.perf_counter() - started)
        stats = distribution(seconds)
        data[f"{count}-{mode}"] = stats
        target = count == 100_000 and mode == "hybrid"
        rows.append(Row("5", f"RETRIEVAL_MODE={mode}: top-{TOP_K} search, {count:,} chunks: p50 / p99",
                        f"{ms(stats['p50'])} / {ms(stats['p99'])}", "p50 <= 15 ms" if target else "",
                        verdict(stats["p50"] <= 0.015) if target else "",
                        f"retriever.search, query embedding excluded; chunks of {WORDS_PER_CHUNK} Zipf-drawn words "
                        f"({VOCABULARY:,}-word vocabulary), 6-word queries; {len(queries)} queries"))
    return rows


WORDS = ("adapter", "vector", "store", "request", "model", "batch", "token", "server", "memory", "latency",
         "document", "chunk", "embedding", "index", "query", "answer", "weight", "merge", "queue", "thread")


def _document_folder(ctx: Context, files: int, paragraphs: int) -> Any:
    """`files` text files of `paragraphs` ~450-character paragraphs each (about one chunk per paragraph)."""
    chooser = random.Random(0)
    folder = ctx.scratch / "ingest-docs"
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(files):
        text = "\n\n".join(
            " ".join(chooser.choice(WORDS) for _ in range(64)).capitalize() + "." for _ in range(paragraphs))
        (folder / f"doc{number:03d}.txt").write_text(text, encoding="utf-8")
    return folder


def ingestion(ctx: Context) -> SectionResult:
    from app.config import Settings
    from app.rag.embeddings import create_embedder
    from app.rag.ingestion import ingest_folder
    from app.rag.stores.base import DEFAULT_COLLECTION
    from app.rag.stores.faiss_store import FaissBackend

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    folder = _document_folder(ctx, files=ctx.size(40, 6), paragraphs=10)
    started = time.perf_counter()
    embedder = create_embedder(settings)
    embedder.embed(["warm-up"])
    load_seconds = time.perf_counter() - started
    store = FaissBackend(embedder, ctx.scratch / "ingest-store").collection(DEFAULT_COLLECTION)
    report = ingest_folder(folder, store, chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap,
                           rebuild=True, show_progress=False)
    rate = report.chunks_embedded / report.seconds
    data = {"files": len(report.added), "chunks": report.chunks_embedded, "seconds": report.seconds,
            "chunks_per_s": rate, "embedder_load_s": load_seconds, "chunk_size": settings.chunk_size,
            "embedding_model": settings.embedding_model}
    measure = (f"ingestion: {report.chunks_embedded} chunks of <= {settings.chunk_size} chars, embedded + indexed "
               "(FAISS + BM25)")
    rows = [Row("6", measure,
                f"{rate:.1f} chunks/s", ">= 150 chunks/s", verdict(rate >= 150),
                f"MiniLM-L6 on the CPU; {report.seconds:.1f} s for {len(report.added)} files")]
    return SectionResult(6, "Ingestion", data, rows)
