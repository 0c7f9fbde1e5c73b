"""The shipped demo adapter (trained by scripts/finetune_lora.py on data/demo_qa.jsonl) shows its style."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.main import create_app
from app.rag.embeddings import Embedder
from app.rag.ingestion import ingest_folder
from tests.conftest import REPO_ROOT, faiss_store, make_settings, running_server

pytestmark = [pytest.mark.slow, pytest.mark.numerics]


def test_demo_adapter_answers_in_its_trained_voice_and_the_base_does_not(tmp_path: Path, embedder: Embedder) -> None:
    store = tmp_path / "docs-store"
    ingest_folder(
        REPO_ROOT / "docs", faiss_store(embedder, store), chunk_size=500, chunk_overlap=80, show_progress=False
    )
    settings = make_settings(tmp_path, vector_store_path=store, lora_model_path=REPO_ROOT / "lora_adapters",
                             max_new_tokens=16)
    question = {"query": "Is it possible to run two ingestion jobs simultaneously?"}  # phrased unlike the training data
    with running_server(create_app(settings)) as url, httpx.Client(base_url=url, timeout=120) as client:
        adapted = client.post("/ask", json=question).json()
        base = client.post("/ask", json={**question, "adapter": None}).json()
        info = client.get("/model_info").json()
    assert info["lora_exists"] is True and info["default_adapter"] == "default"
    assert adapted["model_used"] == "lora" and adapted["answer"].startswith("According to docs/")
    assert base["model_used"] == "base" and not base["answer"].startswith("According to")
