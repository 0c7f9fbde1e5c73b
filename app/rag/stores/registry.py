"""Stores by VECTOR_STORE_BACKEND name: a new kind of store is one module plus one line in STORES."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from app.config import Settings, SettingsError
from app.rag.embeddings import Embedder
from app.rag.stores.base import StoreBackend
from app.rag.stores.faiss_store import FaissBackend


def _milvus(settings: Settings, embedder: Embedder) -> StoreBackend:
    from app.rag.stores.milvus_store import MilvusBackend  # pymilvus is imported only where Milvus is used

    return MilvusBackend(embedder, settings.milvus_uri, settings.milvus_token.get_secret_value(),
                         settings.milvus_timeout)


StoreFactory = Callable[[Settings, Embedder], StoreBackend]

STORES: Mapping[str, StoreFactory] = {
    "faiss": lambda settings, embedder: FaissBackend(embedder, settings.vector_store_path),
    "milvus": _milvus,
}


def create_store_backend(settings: Settings, embedder: Embedder) -> StoreBackend:
    """The store VECTOR_STORE_BACKEND names, for collections embedded by `embedder`."""
    factory = STORES.get(settings.vector_store_backend)
    if factory is None:
        raise SettingsError(
            f"VECTOR_STORE_BACKEND={settings.vector_store_backend!r} is invalid: allowed: {', '.join(sorted(STORES))}"
        )
    return factory(settings, embedder)
