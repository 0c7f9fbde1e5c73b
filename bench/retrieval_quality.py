"""9. Retrieval quality: recall@1, recall@4 and MRR of each RETRIEVAL_MODE on a labelled question set.

bench/data/corpus holds ten short documents in English and the same ten topics written anew in Chinese;
bench/data/questions.json asks about them in words unlike the text's, each with the file that answers it.
A question is answered at rank r when the r-th distinct file among the hits is that file (MRR over the first
EVALUATION_DEPTH chunks, 0 when it is not among them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.rag.collections import Collections
from app.rag.embeddings import Embedder
from app.rag.ingestion import ingest_folder
from app.rag.retrieval.base import Retriever
from app.rag.retrieval.registry import RETRIEVERS
from app.rag.stores.base import DEFAULT_COLLECTION, StoreBackend
from app.rag.stores.faiss_store import FaissBackend
from app.rag.stores.milvus_store import MilvusBackend
from bench.common import Context, Row, SectionResult, verdict

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "corpus"
QUESTIONS = DATA / "questions.json"
EVALUATION_DEPTH = 10
LANGUAGES = ("en", "zh")
STORES = ("faiss", "milvus")  # VECTOR_STORE_BACKEND names


@dataclass(frozen=True)
class Question:
    language: str
    question: str
    file: str  # relative to CORPUS


@dataclass(frozen=True)
class Quality:
    questions: int
    recall_at_1: float
    recall_at_4: float
    mrr: float
    misses_at_1: list[str]  # the questions whose first file was not the right one


def questions(language: str) -> list[Question]:
    payload = json.loads(QUESTIONS.read_text(encoding="utf-8"))
    return [Question(**item) for item in payload["questions"] if item["language"] == language]


def file_ranks(retriever: Retriever, question: str) -> list[str]:
    """The files of the hits, best first, each once, as `file` in the question set names them."""
    files: list[str] = []
    for hit in retriever.search(question, EVALUATION_DEPTH):
        name = str(hit.chunk.metadata["source"])  # "zh/茶园.md": ingested from corpus/zh, named from there
        if name not in files:
            files.append(name)
    return files


def quality(retriever: Retriever, asked: Iterable[Question]) -> Quality:
    ranks, misses = [], []
    for item in asked:
        files = file_ranks(retriever, item.question)
        rank = files.index(item.file) + 1 if item.file in files else None
        ranks.append(rank)
        if rank != 1:
            misses.append(item.question)
    count = len(ranks)
    return Quality(
        questions=count,
        recall_at_1=sum(rank == 1 for rank in ranks) / count,
        recall_at_4=sum(rank is not None and rank <= 4 for rank in ranks) / count,
        mrr=sum(1 / rank for rank in ranks if rank is not None) / count,
        misses_at_1=misses,
    )


def collections_of(folder: Path, embedder: Embedder, store_path: Path, store: str = "faiss") -> Collections:
    """`folder` ingested as the default collection of a `store` (faiss or milvus: Milvus Lite) at `store_path`,
    loaded."""
    backend: StoreBackend = (
        FaissBackend(embedder, store_path) if store == "faiss"
        else MilvusBackend(embedder, str(store_path.with_suffix(".db")), "", 60.0)
    )
    ingest_folder(folder, backend.collection(DEFAULT_COLLECTION), chunk_size=500, chunk_overlap=80, rebuild=True,
                  show_progress=False)
    collections = Collections(backend)
    collections.reload_all()
    return collections


def retrieval_quality(ctx: Context) -> SectionResult:
    from app.rag.embeddings import create_embedder

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    embedder = create_embedder(settings)
    data: dict[str, dict[str, object]] = {}
    rows = []
    for store in STORES:
        for language in LANGUAGES:
            scratch = ctx.scratch / f"quality-{store}-{language}"
            collections = collections_of(CORPUS / language, embedder, scratch, store)
            asked = questions(language)
            results = {
                mode: quality(factory(settings, collections), asked) for mode, factory in sorted(RETRIEVERS.items())
            }
            data[f"{store}-{language}" if store != "faiss" else language] = {
                mode: result.__dict__ for mode, result in results.items()
            }
            # The targets: Chinese hybrid recall@1 >= 0.8; English hybrid at least as good as dense.
            targets = {"zh": ("recall@1 >= 0.8", 0.8), "en": ("recall@1 >= dense's", results["dense"].recall_at_1)}
            where = "" if store == "faiss" else ", on Milvus Lite (its own BM25)"
            for mode, result in results.items():
                target, floor = targets[language] if mode == "hybrid" else ("", 0.0)
                rows.append(Row(
                    "9", f"retrieval quality, {language.upper()} ({result.questions} questions), {mode}{where}: "
                    "recall@1 / recall@4 / MRR",
                    f"{result.recall_at_1:.2f} / {result.recall_at_4:.2f} / {result.mrr:.2f}",
                    target, verdict(result.recall_at_1 >= floor) if target else "",
                    f"{embedder.name}; {len(list((CORPUS / language).iterdir()))} documents, questions phrased "
                    "unlike the text (bench/data)"))
    return SectionResult(9, "Retrieval quality", data, rows)
