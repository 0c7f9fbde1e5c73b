"""The app factory: `create_app(settings)` builds a FastAPI app whose models load in its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import cache

import anyio
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.api import (
    admin_router,
    ask_router,
    classification_router,
    documents_router,
    health_router,
    model_router,
    ollama_router,
    openai_router,
    store_router,
    web_router,
)
from app.api.errors import install_error_handlers
from app.api.metrics import Metrics, RequestMetrics, RouteNote
from app.api.metrics import router as metrics_router
from app.api.security import RequestGuard
from app.classification.service import ClassificationService
from app.cli import prepared_settings, settings_or_exit
from app.config import Settings
from app.llm.manager import BACKENDS, BackendEntry, ModelManager
from app.rag.collections import Collections
from app.rag.documents import DocumentService
from app.rag.embeddings import create_embedder
from app.rag.retrieval.registry import create_retriever
from app.rag.service import RAGService, ServiceObserver
from app.rag.store_admin import VectorStoreAdmin
from app.rag.stores.registry import create_store_backend

logger = logging.getLogger(__name__)


async def build_rag_service(
    settings: Settings, backends: Mapping[str, BackendEntry], observer: ServiceObserver | None = None
) -> RAGService:
    """Load the embedder, the vector store, the retriever and the active backend (all off the event loop)."""
    embedder = await anyio.to_thread.run_sync(create_embedder, settings)
    collections = Collections(create_store_backend(settings, embedder))
    await anyio.to_thread.run_sync(collections.reload_all)
    retriever = await anyio.to_thread.run_sync(create_retriever, settings, collections)
    models = ModelManager(settings, backends)
    if settings.preload_models:  # PRELOAD_MODELS=false: the active backend loads on its first request
        await models.start()
    return RAGService(settings, models, retriever, collections, observer)


def serves_with_other_workers(settings: Settings) -> bool:
    """Whether this process is one of several serving together: WORKERS > 1 (start_lora_rag.py --workers), or a
    process uvicorn started as one of its workers (`uvicorn app.lora_main:app --workers N` starts each with
    multiprocessing; so does `--reload`, under which run-time changes are refused too)."""
    import multiprocessing

    return settings.workers > 1 or multiprocessing.parent_process() is not None


def create_app(settings: Settings, backends: Mapping[str, BackendEntry] = BACKENDS) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await build_rag_service(settings, backends, metrics)
        app.state.rag_service = service
        app.state.store_admin = VectorStoreAdmin(settings, service.collections.default)
        app.state.documents = DocumentService(settings, service.collections)
        app.state.classification_service = ClassificationService(service.models)
        logger.info("lora-rag ready: active backend %s", service.models.active)
        if not (settings.api_key_list or settings.admin_api_key_list):
            logger.warning("no API keys configured: every caller is trusted (API_HOST=%s)", settings.api_host)
        try:
            yield
        finally:
            await service.models.close()

    # FastAPI's /docs and /redoc pages load their scripts from a CDN; these serve copies shipped in the package.
    app = FastAPIOffline(
        title="lora-rag",
        description="Questions answered from your documents by a LoRA-adapted local model or Ollama.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.state.serves_with_other_workers = serves_with_other_workers(settings)
    metrics = Metrics(settings, app.state) if settings.metrics_enabled else None
    if metrics is not None:
        app.add_middleware(RouteNote)  # inside the guard, which copies the scope FastAPI routes on
    app.add_middleware(RequestGuard, settings=settings)
    if metrics is not None:
        app.add_middleware(RequestMetrics, metrics=metrics)  # outside the guard: its refusals count too
        app.state.metrics = metrics
        app.include_router(metrics_router)
    for module in (ask_router, model_router, health_router, admin_router, store_router, documents_router, openai_router,
                   ollama_router, web_router, classification_router):
        app.include_router(module.router)
    return app


def __getattr__(name: str) -> FastAPI:
    """`uvicorn app.main:app`: the design's "original RAG API" (design card 003, "method 3", beside
    `app.lora_main` on another port): the same service, starting on the Ollama backend unless DEFAULT_BACKEND or
    USE_LORA_DEFAULT is set. Made when first asked for, so importing this module reads no settings."""
    if name == "app":
        return _original_rag_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _original_rag_app() -> FastAPI:
    configured = {"default_backend", "use_lora_default"} & settings_or_exit().model_fields_set
    return create_app(prepared_settings() if configured else prepared_settings(default_backend="ollama"))
