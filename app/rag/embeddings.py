"""Text embedders: a local sentence-transformers model (the embedded default) or an Ollama model.

Vectors are L2-normalised float32, so FAISS inner product is cosine similarity.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import httpx
import numpy as np

from app.config import Settings
from app.errors import BackendUnavailableError, ModelLoadError
from app.llm.model_source import resolve_embedding_model
from app.llm.numerics.choice import CpuCapability

logger = logging.getLogger(__name__)

EMBED_BATCH_SIZE = 32


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class Embedder(ABC):
    """Turns texts into normalised vectors of a fixed dimension."""

    #: the EMBEDDING_MODEL value; stored in the vector store's manifest to catch a model change
    name: str

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Shape (len(texts), dimension), float32, unit length."""

    def dimension(self) -> int:
        """The width of its vectors (one text embedded: a model may not say it, an Ollama model does not)."""
        return int(self.embed(["dimension probe"]).shape[1])


class SentenceTransformerEmbedder(Embedder):
    """A local sentence-transformers model on the CPU, in bfloat16 where the CPU has it natively (EMBEDDING_DTYPE).

    Embedding is compute-bound (~2.7 GFLOP per 500-character chunk through MiniLM-L6): bfloat16 embeds 1.3-3x
    faster than float32 here, with cosine >= 0.99 to the float32 vectors and the same top-1 retrieval. The server
    embeds queries and ingestion embeds documents with the one embedder the settings describe, so both sides of a
    search come from the same weights."""

    def __init__(
        self, name: str, cache_dir: str | None = None, dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = name
        source = resolve_embedding_model(name)
        try:
            # On the CPU: a small encoder gains little from a GPU and would compete with the generator there.
            self._model = SentenceTransformer(source, device="cpu", cache_folder=cache_dir, trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load the embedding model '{name}': {error}") from None
        if dtype == "bfloat16" or (dtype == "auto" and CpuCapability.detect().native_bf16):
            self._model.to(torch.bfloat16)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._model.encode(
            list(texts), batch_size=EMBED_BATCH_SIZE, normalize_embeddings=True, show_progress_bar=False
        )
        return _normalise(vectors)


class OllamaEmbedder(Embedder):
    """Embeddings from Ollama's `/api/embed` (EMBEDDING_MODEL=ollama:<name>)."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.name = settings.embedding_model
        self._model = model
        self._url = f"{settings.ollama_base_url}/api/embed"
        self._timeout = httpx.Timeout(settings.ollama_read_timeout, connect=settings.ollama_connect_timeout)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        try:
            response = httpx.post(
                self._url, json={"model": self._model, "input": list(texts)}, timeout=self._timeout
            )
        except httpx.HTTPError:
            raise BackendUnavailableError(
                f"Ollama embeddings are not reachable at {self._url}: start it with `ollama serve`"
            ) from None
        if response.status_code == 404:
            raise BackendUnavailableError(
                f"the Ollama embedding model '{self._model}' is not available: run `ollama pull {self._model}`"
            )
        try:
            response.raise_for_status()
            vectors = response.json()["embeddings"]
        except (httpx.HTTPStatusError, ValueError, KeyError, TypeError):
            raise BackendUnavailableError(f"Ollama at {self._url} gave an unusable embedding answer") from None
        if len(vectors) != len(texts):
            raise BackendUnavailableError(f"Ollama returned {len(vectors)} embeddings for {len(texts)} texts")
        return _normalise(np.asarray(vectors))


def create_embedder(settings: Settings) -> Embedder:
    ollama_model = settings.ollama_embedding_model
    if ollama_model:
        return OllamaEmbedder(settings, ollama_model)
    return SentenceTransformerEmbedder(
        settings.embedding_model,
        str(settings.cache_dir) if settings.cache_dir else None,
        dtype=settings.embedding_dtype,
    )


class DeferredEmbedder(Embedder):
    """The configured embedder, loaded at its first use: for work that may need only its name (the launcher
    looking for an existing store, the configuration check), so the model is not loaded for nothing."""

    def __init__(self, settings: Settings) -> None:
        self.name = settings.embedding_model
        self._settings = settings
        self._loaded: Embedder | None = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._loaded is None:
            self._loaded = create_embedder(self._settings)
        return self._loaded.embed(texts)
