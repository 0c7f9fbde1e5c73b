"""Retrieval modes against the real embedder, the real FAISS and BM25 indexes of real ingested stores.

The embedded embedder (MiniLM-L6) is English-only; bench/data holds ten documents in each language and questions
phrased unlike their text. Lexical and hybrid retrieval must find Chinese answers that dense retrieval misses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.config import SettingsError
from app.errors import NotFoundError, VectorStoreError
from app.rag.collections import Collections
from app.rag.embeddings import Embedder
from app.rag.ingestion import ingest_folder
from app.rag.retrieval.hybrid import HybridRetriever
from app.rag.retrieval.registry import RETRIEVERS, create_retriever
from app.rag.retrieval.tokenize import tokenize
from app.rag.vector_store import ARRAYS_FILE, MANIFEST_FILE, VOCABULARY_FILE, current_version, load_store
from bench.retrieval_quality import CORPUS, collections_of, quality, questions
from tests.conftest import faiss_store, make_settings


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, float32_embedder: Embedder) -> dict[str, Collections]:
    folder = tmp_path_factory.mktemp("quality")
    return {language: collections_of(CORPUS / language, float32_embedder, folder / language)
            for language in ("en", "zh")}


def test_chinese_questions_phrased_unlike_the_text_find_their_file_first_in_hybrid_and_lexical_mode(
    stores: dict[str, Collections], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    results = {mode: quality(factory(settings, stores["zh"]), questions("zh")) for mode, factory in RETRIEVERS.items()}
    # Why hybrid exists: the English-only embedder ranks the right Chinese file first for few of these (2 of 12
    # when written); not asserted, a better embedder may well do better.
    print({mode: result.recall_at_1 for mode, result in results.items()}, results["dense"].misses_at_1)
    assert results["lexical"].recall_at_1 >= 0.8, results["lexical"].misses_at_1
    assert results["hybrid"].recall_at_1 >= 0.8, results["hybrid"].misses_at_1
    assert results["hybrid"].recall_at_4 == 1.0


def test_on_english_questions_hybrid_is_at_least_as_good_as_dense(
    stores: dict[str, Collections], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    dense = quality(RETRIEVERS["dense"](settings, stores["en"]), questions("en"))
    hybrid = quality(RETRIEVERS["hybrid"](settings, stores["en"]), questions("en"))
    print("dense", dense, "hybrid", hybrid)
    assert hybrid.recall_at_4 >= dense.recall_at_4
    assert hybrid.recall_at_1 >= dense.recall_at_1, hybrid.misses_at_1
    # Relative fusion scales a single weak BM25 match to 1 like a perfect one, and ranks one question lower.
    relative = HybridRetriever(stores["en"], "relative", rrf_k=60, candidates=20)
    assert quality(relative, questions("en")).recall_at_1 < dense.recall_at_1


def test_hits_say_which_score_they_carry(stores: dict[str, Collections], tmp_path: Path) -> None:
    expected = {"dense": "cosine", "lexical": "bm25", "hybrid": "calibrated"}
    for mode, kind in expected.items():
        retriever = create_retriever(make_settings(tmp_path, retrieval_mode=mode), stores["zh"])
        hits = retriever.search("熊猫一天要吃多少竹子？", 3)
        assert hits and retriever.score_kind == kind and {hit.score_kind for hit in hits} == {kind}
        assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    for fusion in ("rrf", "relative"):
        fused = HybridRetriever(stores["zh"], fusion, rrf_k=60, candidates=20)
        assert {hit.score_kind for hit in fused.search("熊猫", 3)} == {fusion}


def test_an_unknown_mode_fusion_or_collection_is_refused_naming_the_valid_ones(
    stores: dict[str, Collections], tmp_path: Path
) -> None:
    with pytest.raises(SettingsError, match=r"RETRIEVAL_MODE='sparse' is invalid: allowed: dense, hybrid, lexical"):
        create_retriever(make_settings(tmp_path, retrieval_mode="sparse"), stores["en"])
    with pytest.raises(SettingsError, match=r"HYBRID_FUSION='max' is invalid: allowed: calibrated, relative, rrf"):
        create_retriever(make_settings(tmp_path, hybrid_fusion="max"), stores["en"])
    retriever = create_retriever(make_settings(tmp_path), stores["en"])
    with pytest.raises(NotFoundError, match="no collection 'other'; collections: default"):
        retriever.search("tea", 2, collection="other")


def test_tokenizer_segments_chinese_and_splits_latin_words_in_mixed_text() -> None:
    # Search mode: the long word and the words inside it, so either finds the other.
    assert tokenize("LoRA适配器在GPU显存里") == ["lora", "适配", "配器", "适配器", "gpu", "显存", "里"]
    assert tokenize("Ｆｕｌｌ-width DIGITS ２０２４ and the stop words") == [
        "full", "width", "digits", "2024", "stop", "words"
    ]


def test_the_lexical_index_round_trips_through_a_store_version(stores: dict[str, Collections]) -> None:
    live = stores["zh"].default
    assert live.store is not None
    loaded = load_store(live.path)
    for question in ("高铁行李", "饺子 面粉", "backup"):
        assert loaded.search_lexical(question, 5) == live.store.search_lexical(question, 5)
    assert loaded.lexical.size == loaded.size == 10


@pytest.mark.parametrize("name", [ARRAYS_FILE, VOCABULARY_FILE])
def test_a_tampered_or_unlisted_lexical_file_is_refused(
    stores: dict[str, Collections], tmp_path: Path, name: str
) -> None:
    store = tmp_path / "store"
    shutil.copytree(stores["en"].default.path, store)
    version_folder = store / str(current_version(store))
    original = (version_folder / name).read_bytes()
    (version_folder / name).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(VectorStoreError, match=f"'{name}' does not match its checksum"):
        load_store(store)

    (version_folder / name).write_bytes(original)
    payload = json.loads((version_folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    del payload["checksums"][name]
    (version_folder / MANIFEST_FILE).write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(VectorStoreError, match=f"has no checksum for {name}"):
        load_store(store)


def test_incremental_ingestion_keeps_the_lexical_index_in_step(tmp_path: Path, embedder: Embedder) -> None:
    source, store = tmp_path / "docs", tmp_path / "store"
    shutil.copytree(CORPUS / "zh", source)
    ingest_folder(source, faiss_store(embedder, store), chunk_size=500, chunk_overlap=80, show_progress=False)
    assert load_store(store).search_lexical("饺子", 1)[0].chunk.metadata["source"] == "docs/饺子.md"

    (source / "饺子.md").write_text("# 韭菜盒子\n\n韭菜切碎，和鸡蛋拌匀，包进面皮里煎熟。", encoding="utf-8")
    report = ingest_folder(source, faiss_store(embedder, store), chunk_size=500, chunk_overlap=80, show_progress=False)
    assert report.updated == ["docs/饺子.md"] and report.chunks_embedded == 1
    updated = load_store(store)
    assert updated.search_lexical("饺子", 5) == []  # the old words are gone with the old chunk
    assert updated.search_lexical("韭菜", 1)[0].chunk.metadata["source"] == "docs/饺子.md"
    assert updated.search_lexical("熊猫", 1)[0].chunk.metadata["source"] == "docs/熊猫.md"  # kept files still found


def test_a_repeated_word_counts_once_and_the_lexical_share_stays_within_its_weight(
    stores: dict[str, Collections], tmp_path: Path
) -> None:
    store = stores["zh"].default.store
    assert store is not None
    assert store.search_lexical("熊猫 熊猫 熊猫", 3) == store.search_lexical("熊猫", 3)
    retriever = create_retriever(make_settings(tmp_path), stores["zh"])
    for question in ("熊猫熊猫熊猫熊猫", "backup backup backup"):
        hits = retriever.search(question, 3)
        assert hits and all(hit.score <= 1.0 + 2.0 + 1e-6 for hit in hits)  # cosine <= 1, BM25 share <= 1 x 2
