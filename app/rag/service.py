"""The RAG chain: retrieve -> prompt with context -> generate on whichever backend the request got."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio

from app.config import Settings
from app.errors import ServiceBusyError, ValidationFailedError, VectorStoreError
from app.llm.adapters import has_adapter_files
from app.llm.base import AdapterSpec, ComponentHealth, GenerationParams, ModelUsed, TextCallback
from app.llm.manager import LORA, OLLAMA, ModelManager
from app.rag.embeddings import Embedder
from app.rag.prompts import build_messages
from app.rag.vector_store import SearchHit, VectorStore, load_store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AskResult:
    answer: str
    sources: list[SearchHit]
    model_used: ModelUsed
    processing_time: float
    prompt_tokens: int
    completion_tokens: int
    adapters: str


class Retriever:
    """Embeds the question and searches the live store version; `reload` swaps in a new version whole."""

    def __init__(self, embedder: Embedder, store_path: Path) -> None:
        self.embedder = embedder
        self.store_path = store_path
        self._store: VectorStore | None = None
        self.load_error: str | None = None

    @property
    def store(self) -> VectorStore | None:
        return self._store

    def reload(self) -> None:
        """Load the store's live version; on failure keep serving the last good one."""
        try:
            self._store = load_store(self.store_path, expected_embedding_model=self.embedder.name)
            self.load_error = None
            logger.info("vector store %s loaded: %d chunks", self._store.version, self._store.size)
        except VectorStoreError as error:
            self.load_error = error.message
            logger.error("vector store not loaded: %s", error.message)

    def search(self, query: str, k: int) -> list[SearchHit]:
        store = self._store
        if store is None:
            raise VectorStoreError(self.load_error or "the vector store is not loaded")
        return store.search(self.embedder.embed([query])[0], k)


class GenerationLimiter:
    """At most `capacity` generations at once and `queue_size` waiting; beyond that, refuse at once."""

    def __init__(self, capacity: int, queue_size: int) -> None:
        self._semaphore = asyncio.Semaphore(capacity)
        self._capacity = capacity
        self._queue_size = queue_size
        self._admitted = 0

    async def __aenter__(self) -> None:
        if self._admitted >= self._capacity + self._queue_size:
            raise ServiceBusyError("the server is at capacity; retry shortly", retry_after=2)
        self._admitted += 1
        try:
            await self._semaphore.acquire()
        except BaseException:
            self._admitted -= 1
            raise

    async def __aexit__(self, *_: object) -> None:
        self._semaphore.release()
        self._admitted -= 1


class RAGService:
    def __init__(self, settings: Settings, models: ModelManager, retriever: Retriever) -> None:
        self._settings = settings
        self.models = models
        self.retriever = retriever
        self._limiter = GenerationLimiter(settings.max_concurrent_generations, settings.max_queued_requests)

    async def ask(
        self,
        query: str,
        use_lora: bool | None = None,
        adapters: AdapterSpec | None = None,
        on_text: TextCallback | None = None,
    ) -> AskResult:
        started = time.perf_counter()
        query = query.strip()
        if not query:
            raise ValidationFailedError("query must not be empty")
        if len(query) > self._settings.max_query_chars:
            raise ValidationFailedError(
                f"query is {len(query)} characters; the limit is MAX_QUERY_CHARS={self._settings.max_query_chars}"
            )
        if adapters is not None and use_lora is None:
            use_lora = True  # naming an adapter (or the base model) means the local model
        backend = await self.models.backend_for(use_lora)
        hits = await anyio.to_thread.run_sync(self.retriever.search, query, self._settings.retrieval_top_k)
        params = GenerationParams(
            max_new_tokens=self._settings.max_new_tokens,
            temperature=self._settings.temperature,
            top_p=self._settings.top_p,
        )
        async with self._limiter:
            result = await backend.generate(build_messages(query, hits), params, adapters, on_text)
        return AskResult(
            answer=result.text,
            sources=hits,
            model_used=result.model_used,
            processing_time=time.perf_counter() - started,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            adapters=result.adapters,
        )

    def model_info(self) -> dict[str, Any]:
        settings = self._settings
        return {
            "base_model": settings.base_model_name,
            "lora_model_path": str(settings.lora_model_path),
            "lora_exists": has_adapter_files(settings.lora_model_path),
            "using_lora": self.models.active == LORA,
            "active_backend": self.models.active,
            "cache_dir": str(settings.cache_dir) if settings.cache_dir else None,
            "vector_store_path": str(settings.vector_store_path),
            "embedding_model": settings.embedding_model,
            "device": settings.device,
            "quantization": settings.quantization_type if settings.enable_quantization else "none",
            "ollama_model": settings.ollama_model,
            "ollama_base_url": settings.ollama_base_url,
            **self.models.describe(),
        }

    async def health(self) -> HealthReport:
        store = self.retriever.store
        components = {
            "rag_handler": ComponentHealth(ok=True, detail="ready"),
            "vector_store": ComponentHealth(ok=True, detail=f"{store.size} chunks ({store.version})")
            if store is not None
            else ComponentHealth(ok=False, detail=self.retriever.load_error or "not loaded"),
            "lora_model": await self.models.component_health(LORA),
            "ollama_service": await self.models.component_health(OLLAMA),
        }
        active = components["lora_model" if self.models.active == LORA else "ollama_service"]
        if not active.ok or not components["vector_store"].ok:
            status = "unhealthy"
        elif all(component.ok for component in components.values()):
            status = "healthy"
        else:
            status = "degraded"
        return HealthReport(status=status, components=components)


@dataclass(frozen=True)
class HealthReport:
    status: Literal["healthy", "degraded", "unhealthy"]
    components: dict[str, ComponentHealth]
