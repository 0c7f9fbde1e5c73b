"""The RAG chain: retrieve -> prompt with context -> generate on whichever backend the request got."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import unicodedata
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar

import anyio
import numpy as np

from app.config import OLLAMA_EMBEDDING_PREFIX, Settings
from app.errors import (
    AppError,
    BackendTimeoutError,
    BadRequestError,
    ServiceBusyError,
    ValidationFailedError,
    VectorStoreError,
)
from app.llm.adapters.inspect import has_adapter_files
from app.llm.base import (
    SEED_MAX,
    AdapterSpec,
    ChatMessage,
    ComponentHealth,
    FinishReason,
    GenerationParams,
    GenerationResult,
    ModelUsed,
    OutputConstraint,
    TextCallback,
)
from app.llm.manager import LORA, ModelManager
from app.llm.model_source import default_cache_dir
from app.rag.citations import CITATIONS_INSTRUCTION, Citation, citation_constraint, read_cited
from app.rag.collections import DEFAULT_COLLECTION, Collections
from app.rag.embeddings import Embedder
from app.rag.prompts import build_messages, fit_to_budget, with_context
from app.rag.retrieval.base import Retriever
from app.rag.vector_store import SearchHit

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class AskResult:
    answer: str
    sources: list[SearchHit]
    model_used: ModelUsed
    processing_time: float
    prompt_tokens: int
    completion_tokens: int
    adapters: str
    finish_reason: FinishReason
    notice: str | None
    citations: tuple[Citation, ...] | None = None  # asked for: the passages' sentences the answer quotes


@dataclass(frozen=True)
class ChatResult:
    choices: tuple[GenerationResult, ...]  # one per choice asked for (OpenAI's `n`), the first at least
    sources: list[SearchHit]

    @property
    def result(self) -> GenerationResult:
        return self.choices[0]


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (texts, dimensions), unit length
    words: int  # whitespace-separated words of the texts: the embedders report no token counts


def is_blank(text: str) -> bool:
    """Nothing to search or answer: only whitespace, control characters (Cc) and invisible format
    characters (Cf: zero-width space and joiners, the byte-order mark), which `str.strip` keeps."""
    return all(char.isspace() or unicodedata.category(char) in ("Cc", "Cf") for char in text)


def _nth_seed(seed: int | None, number: int) -> int | None:
    """The seed of a request's `number`th choice: its seed + number, kept within the 64-bit range."""
    if seed is None:
        return None
    nth = seed + number
    return nth - 2**64 if nth > SEED_MAX else nth


def _spec_text(spec: AdapterSpec | None) -> str | list[dict[str, str | float]]:
    if spec is None:
        return "server-default"
    return [{"name": name, "weight": weight} for name, weight in spec] if spec else "base"


class ServiceObserver(Protocol):
    """Told of each retrieval, each finished generation and each valid RAG question, answered or failed
    (app/api/metrics.py counts them for /metrics)."""

    def retrieved(self, seconds: float) -> None: ...

    def answered_from_documents(self, seconds: float) -> None: ...

    def generated(self, result: GenerationResult) -> None: ...


@dataclass(frozen=True)
class QueueState:
    """The generations holding a place now, and the adapters they name (server default: not named)."""

    running: int
    waiting: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]


class GenerationLimiter:
    """At most `capacity` generations at once and `queue_size` waiting; beyond that, refuse at once."""

    def __init__(self, capacity: int, queue_size: int) -> None:
        self._semaphore = asyncio.Semaphore(capacity)
        self._capacity = capacity
        self._queue_size = queue_size
        # Adapter names of the generations waiting and running, kept so monitoring can tell which adapters
        # are busy (vLLM's lora_requests_info, which LoRA-aware gateways route by).
        self._waiting: Counter[str] = Counter()
        self._running: Counter[str] = Counter()
        self._waiting_count = 0
        self._running_count = 0

    @asynccontextmanager
    async def place(self, adapters: Iterable[str]) -> AsyncIterator[None]:
        """Hold a place for one generation naming `adapters` while the block runs."""
        if self._waiting_count + self._running_count >= self._capacity + self._queue_size:
            raise ServiceBusyError("the server is at capacity; retry shortly", retry_after=2)
        names = Counter(set(adapters))
        self._waiting_count += 1
        self._waiting += names
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting_count -= 1
            self._waiting -= names
        self._running_count += 1
        self._running += names
        try:
            yield
        finally:
            self._semaphore.release()
            self._running_count -= 1
            self._running -= names

    def state(self) -> QueueState:
        return QueueState(
            self._running_count, self._waiting_count, tuple(sorted(self._running)), tuple(sorted(self._waiting))
        )


class RAGService:
    def __init__(
        self,
        settings: Settings,
        models: ModelManager,
        retriever: Retriever,
        collections: Collections,
        observer: ServiceObserver | None = None,
    ) -> None:
        self._settings = settings
        self._observer = observer
        self.models = models
        self.retriever = retriever  # whichever RETRIEVAL_MODE chose; only its `search` is used here
        self.collections = collections  # the stores it searches, for health and for store administration
        self._limiter = GenerationLimiter(settings.max_concurrent_generations, settings.max_queued_requests)
        # Embedding requests are admitted apart from generations: 20 concurrent requests of 2,048 texts once took
        # every worker thread, and a 2-token chat went from 0.2 to 3.8 s.
        self._embedding_limiter = GenerationLimiter(settings.max_concurrent_embeddings, settings.max_queued_requests)

    async def ask(
        self,
        query: str,
        backend: str | None = None,
        adapters: AdapterSpec | None = None,
        on_text: TextCallback | None = None,
        collection: str = DEFAULT_COLLECTION,
        constraint: OutputConstraint | None = None,
        citations: bool = False,
    ) -> AskResult:
        """Answer `query` from `collection`'s passages; with `constraint`, the answer is JSON (for a schema); with
        `citations`, it cites the passages' sentences it used (`app/rag/citations.py`; streamed whole at its end)."""
        started = time.perf_counter()
        query = self._checked_query(query)
        with self._timed_rag_question(started):
            hits = await self._within_budget(await self._retrieve(query, collection), backend, adapters is not None)
            messages = build_messages(query, hits, CITATIONS_INSTRUCTION if citations else "")
            params = replace(self.default_params(), constraint=citation_constraint(hits) if citations else constraint)
            (result,) = await self.generate(messages, params, backend, adapters, None if citations else on_text)
        answer, cited = read_cited(result.text, hits) if citations else (result.text, ())
        if citations and on_text is not None and answer:
            on_text(answer)
        return AskResult(
            citations=cited if citations else None,
            answer=answer,
            sources=hits,
            model_used=result.model_used,
            processing_time=time.perf_counter() - started,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            adapters=result.adapters,
            finish_reason=result.finish_reason,
            notice=replace(result, text=answer).notice,  # a cited answer's text is its `answer`, not the JSON
        )

    async def chat(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        adapters: AdapterSpec | None,
        use_rag: bool,
        on_text: TextCallback | None = None,
        collection: str = DEFAULT_COLLECTION,
        choices: int = 1,
    ) -> ChatResult:
        """A chat completion on the local model; with `use_rag`, answered from the vector store; `choices` answers
        to the same prompt (streamed only when one)."""
        self._check_messages(messages)
        hits: list[SearchHit] = []
        started = time.perf_counter()
        if use_rag:
            question = self._checked_query(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))
        with self._timed_rag_question(started) if use_rag else nullcontext():
            if use_rag:
                hits = await self._within_budget(await self._retrieve(question, collection), None, True)
                messages = with_context(messages, hits)
            # The OpenAI routes serve the base model and its adapters: the active backend when it serves adapters
            # (lora, remote), else the local model.
            results = await self.generate(messages, params, None, adapters, on_text, serves_adapters=True,
                                          choices=choices)
        return ChatResult(choices=results, sources=hits)

    @contextmanager
    def _timed_rag_question(self, started: float) -> Iterator[None]:
        """Tell the observer of a valid RAG question when it ends, answered or not."""
        try:
            yield
        finally:
            if self._observer is not None:
                self._observer.answered_from_documents(time.perf_counter() - started)

    @property
    def embedder(self) -> Embedder:
        """The embedder the store's vectors were made with (also /api/embed's and /v1/embeddings' model)."""
        return self.collections.embedder

    @property
    def embedding_name(self) -> str:
        """The embedder's public name: EMBEDDING_MODEL without its `embedded:` or `ollama:` prefix."""
        name = self.embedder.name
        return name.partition(":")[2] if name.startswith(("embedded:", OLLAMA_EMBEDDING_PREFIX)) else name

    async def embed(self, texts: list[str], dimensions: int | None = None) -> Embeddings:
        """The embedder's vectors of `texts` (off the event loop); with `dimensions`, the first that many of each,
        renormalised to unit length (more than the embedder has: 400). Each text is held to MAX_QUERY_CHARS, as a
        question is; at most MAX_CONCURRENT_EMBEDDINGS requests embed at once, MAX_QUEUED_REQUESTS more wait, and
        beyond that the answer is 503 `busy`."""
        limit = self._settings.max_query_chars
        for number, text in enumerate(texts):
            if len(text) > limit:
                raise ValidationFailedError(
                    f"input[{number}] is {len(text)} characters; the limit is MAX_QUERY_CHARS={limit}"
                )
        if not texts:
            return Embeddings(vectors=np.zeros((0, 0)), words=0)
        async with self._embedding_limiter.place(()):
            vectors = await anyio.to_thread.run_sync(self.embedder.embed, texts)
        if dimensions is not None and dimensions > vectors.shape[1]:
            raise BadRequestError(
                f"dimensions is {dimensions}, but {self.embedding_name} has {vectors.shape[1]}: ask for at most that"
            )
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return Embeddings(vectors=vectors, words=sum(len(text.split()) for text in texts))

    def default_params(self) -> GenerationParams:
        settings = self._settings
        return GenerationParams(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p
        )

    async def generate(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        backend_name: str | None,
        adapters: AdapterSpec | None,
        on_text: TextCallback | None,
        *,
        serves_adapters: bool = False,
        choices: int = 1,
    ) -> tuple[GenerationResult, ...]:
        """Generate on the chosen backend (by name; None: the active one) within the concurrency bound; log one
        `model_lora_combination` event. Naming adapters (or the base model), or `serves_adapters`, means a
        backend that serves adapters. `choices` answers to the one prompt take one place of the bound and decode
        as rows of one batch (the prompt's KV computed once, then shared through the prefix cache); a seed gives
        the k-th choice seed + k, so each differs and each comes again."""
        started = time.perf_counter()
        event: dict[str, Any] = {"event": "model_lora_combination", "adapters_requested": _spec_text(adapters)}
        try:
            backend = await self.models.backend_for(backend_name, serves_adapters or adapters is not None)
            event["backend"] = backend.name
            async with self._limiter.place(name for name, _ in adapters or ()):
                if choices == 1:
                    results: tuple[GenerationResult, ...] = (
                        await self._within_deadline(backend.generate(messages, params, adapters, on_text)),)
                else:
                    several = [backend.generate(messages, replace(params, seed=_nth_seed(params.seed, number)),
                                                adapters) for number in range(choices)]
                    results = tuple(await self._within_deadline(asyncio.gather(*several)))
        except AppError as error:
            event.update(status=error.code, latency_ms=round((time.perf_counter() - started) * 1000, 1))
            logger.info(json.dumps(event, ensure_ascii=False))
            raise
        event.update(
            status="ok",
            model_used=results[0].model_used,
            adapters=results[0].adapters,
            prompt_tokens=results[0].prompt_tokens,
            completion_tokens=sum(result.completion_tokens for result in results),
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        logger.info(json.dumps(event, ensure_ascii=False))
        if self._observer is not None:
            for result in results:
                self._observer.generated(result)
        return results

    def queue_state(self) -> QueueState:
        return self._limiter.state()

    async def _within_deadline(self, generation: Awaitable[T]) -> T:
        """REQUEST_TIMEOUT_SECONDS bounds a generation; cancelling it frees its row in the engine."""
        try:
            return await asyncio.wait_for(generation, timeout=self._settings.request_timeout_seconds)
        except TimeoutError:
            raise BackendTimeoutError(
                f"the answer took longer than REQUEST_TIMEOUT_SECONDS={self._settings.request_timeout_seconds:g}"
            ) from None

    def _checked_query(self, query: str) -> str:
        query = query.strip()
        if is_blank(query):
            raise ValidationFailedError("query must not be empty")
        if len(query) > self._settings.max_query_chars:
            raise ValidationFailedError(
                f"query is {len(query)} characters; the limit is MAX_QUERY_CHARS={self._settings.max_query_chars}"
            )
        return query

    def _check_messages(self, messages: list[ChatMessage]) -> None:
        limits = self._settings
        if len(messages) > limits.max_messages:
            raise ValidationFailedError(
                f"messages has {len(messages)} entries; the limit is MAX_MESSAGES={limits.max_messages}"
            )
        for number, message in enumerate(messages):
            if len(message["content"]) > limits.max_query_chars:
                raise ValidationFailedError(
                    f"messages[{number}] is {len(message['content'])} characters; "
                    f"the limit is MAX_QUERY_CHARS={limits.max_query_chars}"
                )

    async def _retrieve(self, query: str, collection: str) -> list[SearchHit]:
        started = time.perf_counter()
        hits = await anyio.to_thread.run_sync(
            self.retriever.search, query, self._settings.retrieval_top_k, collection
        )
        if self._observer is not None:
            self._observer.retrieved(time.perf_counter() - started)
        return hits

    async def _within_budget(self, hits: list[SearchHit], backend: str | None,
                             serves_adapters: bool) -> list[SearchHit]:
        """The passages that fit CONTEXT_TOKEN_BUDGET in the tokens of the backend that will answer."""
        budget = self._settings.context_token_budget
        if not budget or not hits:
            return hits
        model = await self.models.backend_for(backend, serves_adapters)
        return await anyio.to_thread.run_sync(fit_to_budget, hits, budget, model.count_tokens)

    def model_info(self) -> dict[str, Any]:
        settings = self._settings
        return {
            "base_model": settings.base_model_name,
            "lora_model_path": str(settings.lora_model_path),
            "lora_exists": has_adapter_files(settings.lora_model_path),
            "using_lora": self.models.active == LORA,
            "active_backend": self.models.active,
            "backends": self.models.configured,
            "cache_dir": str(settings.cache_dir or default_cache_dir()),
            "vector_store_path": str(settings.vector_store_path),
            "vector_store_backend": settings.vector_store_backend,
            "vector_store_location": self.collections.backend.location,
            "embedding_model": settings.embedding_model,
            "device": settings.device,
            "quantization": settings.quantization_type if settings.enable_quantization else "none",
            "ollama_model": settings.ollama_model,
            "ollama_base_url": settings.ollama_base_url,
            **self.models.describe(),
        }

    async def health(self) -> HealthReport:
        models = self.models
        components = {
            "rag_handler": ComponentHealth(ok=True, detail="ready"),
            "vector_store": await anyio.to_thread.run_sync(self._store_health),  # Milvus: a call over the network
            **{models.component(name): await models.component_health(name) for name in models.configured},
        }
        active = components[self.models.component(self.models.active)]
        status: Literal["healthy", "degraded", "unhealthy"]
        if not active.ok or not components["vector_store"].ok:
            status = "unhealthy"
        elif all(component.ok for component in components.values()):
            status = "healthy"
        else:
            status = "degraded"
        return HealthReport(status=status, components=components)

    def _store_health(self) -> ComponentHealth:
        """The default collection's store: its kind and place, and its size read now (Milvus: reachable)."""
        default = self.collections.default
        where = f"{default.kind} at {default.location}"
        store = default.store
        if store is None:
            return ComponentHealth(ok=False, detail=f"{where}: {default.load_error or 'not loaded'}")
        try:
            size, others = store.size, len(self.collections.names()) - 1
        except VectorStoreError as error:
            return ComponentHealth(ok=False, detail=error.message)
        more = f"; {others} more collection{'s' if others != 1 else ''}" if others else ""
        version = f" ({store.version})" if store.version else ""
        return ComponentHealth(ok=True, detail=f"{size} chunks{version}{more}; {where}")


@dataclass(frozen=True)
class HealthReport:
    status: Literal["healthy", "degraded", "unhealthy"]
    components: dict[str, ComponentHealth]
