"""Collections: named, separate document sets, each its own store in the store VECTOR_STORE_BACKEND names.

A search names one collection and sees only its chunks. `default` always exists (empty until its first
document); the others exist once they hold content, including those another process made meanwhile (a
`scripts/ingest.py --collection` run, or another replica writing the same Milvus).
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from dataclasses import dataclass

from confusable_homoglyphs import confusables

from app.errors import NotFoundError, VectorStoreError
from app.rag.embeddings import Embedder
from app.rag.stores.base import (
    COLLECTION_NAME,
    DEFAULT_COLLECTION,
    CollectionStore,
    StoreBackend,
    StoreUnavailableError,
    StoreView,
    check_collection_name,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_COLLECTION", "CollectionInfo", "CollectionNotFoundError", "Collections", "check_collection_name"]


class CollectionNotFoundError(NotFoundError):
    code = "collection_not_found"


def _folded(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


def _looks_like(folded: str, other: str) -> bool:
    """Whether two folded names look the same: character by character equal or homoglyphs of each other in
    Unicode's confusables data (UTS #39; its multi-character look-alikes such as `rn` for `m` are left out)."""
    return len(folded) == len(other) and all(
        mine == theirs or _homoglyph(mine, theirs) or _homoglyph(theirs, mine)
        for mine, theirs in zip(folded, other, strict=True)
    )


def _homoglyph(character: str, other: str) -> bool:
    return any(entry["c"] == other for entry in confusables.confusables_data.get(character, ()))


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    documents: int
    chunks: int


class Collections:
    """The served view of every collection, loaded at start and when a collection is written."""

    def __init__(self, backend: StoreBackend) -> None:
        self.backend = backend
        self._lock = threading.Lock()  # guards the mapping; each CollectionStore swaps its own view
        self._live: dict[str, CollectionStore] = {}

    @property
    def embedder(self) -> Embedder:
        return self.backend.embedder

    @property
    def default(self) -> CollectionStore:
        return self.live(DEFAULT_COLLECTION)

    def names(self) -> list[str]:
        """The collections there are: `default` always, the others once they hold content (here or, found now
        in the store, written by another process). StoreUnavailableError when the store cannot be reached."""
        found = self.backend.collection_names()  # StoreUnavailableError: what exists is not known now
        with self._lock:
            known = {name for name, live in self._live.items() if not _being_created(live)} | set(found)
        return [DEFAULT_COLLECTION, *sorted(name for name in known if name != DEFAULT_COLLECTION)]

    def describe(self) -> list[CollectionInfo]:
        """Each collection with the documents and chunks of the view it serves (a collection that cannot be
        reached is StoreUnavailableError, not an empty one)."""
        return [CollectionInfo(name, *_counts(self.served(name))) for name in self.names()]

    def served(self, name: str) -> StoreView | None:
        """The view an existing collection serves; None when it serves none (nothing ingested, or unreadable:
        `load_error` says why); StoreUnavailableError when its store cannot be reached, since "no documents"
        would then be a guess."""
        live = self.live(name)
        store = live.store
        if store is None and live.unavailable:
            raise StoreUnavailableError(live.load_error or "the vector store cannot be reached")
        return store

    def clash(self, name: str) -> str | None:
        """An existing collection that `name` would be confused with, None when there is none or `name` is that
        collection: it differs only in case or in the width of its characters (`Docs`, `DOCS`, `Ｄｏｃｓ`; on a
        case-insensitive disk they would also share one folder), or it looks the same (Unicode's confusables,
        UTS #39: Cyrillic `dеfault` beside `default`)."""
        folded = _folded(name)
        with self._lock:
            being_created = set(self._live)  # a clash with a first upload still being written counts too
        names = dict.fromkeys([*self.names(), *sorted(being_created)])
        return next((known for known in names if known != name and _looks_like(_folded(known), folded)), None)

    def live(self, name: str) -> CollectionStore:
        """An existing collection; CollectionNotFoundError lists the known ones."""
        with self._lock:
            live = self._live.get(name)
        if live is not None and name != DEFAULT_COLLECTION and _being_created(live):
            live = None  # its first content is being written: not there yet (404, not 503), unless it is by now
        if live is None and COLLECTION_NAME.fullmatch(name):
            candidate = self.backend.collection(name)
            if name == DEFAULT_COLLECTION or candidate.exists():  # made meanwhile by another process
                with self._lock:
                    live = self._live.setdefault(name, candidate)
                live.reload()
        if live is None:
            known = ", ".join(self.names())
            raise CollectionNotFoundError(f"no collection {name[:80]!r}; collections: {known}")
        return live

    def reload_all(self) -> None:
        """Load every collection there is (the default one even when empty, so its load error can be reported)."""
        try:
            found = self.backend.collection_names()
        except VectorStoreError as error:  # unreachable: serve what can be served, /health says why not
            logger.error("collections not listed: %s", error.message)
            found = []
        for name in dict.fromkeys([DEFAULT_COLLECTION, *found]):
            self.reload(name)

    def reload(self, name: str) -> CollectionStore:
        """Load the live content of collection `name` (known or new, e.g. after its first ingestion) and serve it."""
        live = self._entry(name)
        live.reload()
        return live

    def serve_live_version(self, name: str) -> StoreView:
        """Serve the content just written to collection `name`; VectorStoreError when it cannot be read."""
        return self._entry(name).serve_live_version()

    def store(self, name: str) -> CollectionStore:
        """Collection `name` (checked) to write into, whether or not it exists yet."""
        return self._entry(check_collection_name(name))

    def _entry(self, name: str) -> CollectionStore:
        with self._lock:
            live = self._live.get(name)
            if live is None:
                live = self.backend.collection(name)
                self._live[name] = live
            return live


def _being_created(live: CollectionStore) -> bool:
    """Taken to write into (`Collections.store`) and never loaded since: a new collection whose first content is
    being written, which neither listings nor questions see until it is served."""
    return live.store is None and live.load_error is None


def _counts(store: StoreView | None) -> tuple[int, int]:
    """A view's documents and chunks; none when it is not loaded."""
    return (len(store.files), store.size) if store is not None else (0, 0)
