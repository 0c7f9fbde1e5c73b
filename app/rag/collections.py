"""Collections: named, separate document sets, each its own versioned store.

Layout of VECTOR_STORE_PATH: the `default` collection is the store in the folder itself (as before collections
existed, so existing stores keep working), and each other collection is a store of its own in
`collections/<name>/`, with its own versions, manifest, lexical index and ingestion lock. A search names one
collection and sees only its chunks.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from app.errors import NotFoundError, ValidationFailedError
from app.rag.embeddings import Embedder
from app.rag.retrieval.live_store import LiveStore
from app.rag.vector_store import VectorStore, store_exists

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "default"
COLLECTIONS_FOLDER = "collections"
# Letters (any script: Chinese names too), digits, '_' and '-', starting with a letter or digit: a name is a
# folder name, so no '.', no separator and nothing hidden.
COLLECTION_NAME = re.compile(r"[^\W_][\w-]{0,63}")


class CollectionNotFoundError(NotFoundError):
    code = "collection_not_found"


def _folded(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


def check_collection_name(name: str) -> str:
    if not COLLECTION_NAME.fullmatch(name):
        raise ValidationFailedError(
            f"collection {name[:80]!r} is not a valid name: 1 to 64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def collection_path(store_root: Path, name: str) -> Path:
    """The store folder of collection `name` (checked) under VECTOR_STORE_PATH."""
    check_collection_name(name)
    return store_root if name == DEFAULT_COLLECTION else store_root / COLLECTIONS_FOLDER / name


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    documents: int
    chunks: int


class Collections:
    """The live store of every collection, loaded at start and when a collection is written."""

    def __init__(self, embedder: Embedder, store_root: Path) -> None:
        self.embedder = embedder
        self.store_root = store_root
        self._lock = threading.Lock()  # guards the mapping; each LiveStore swaps its own version
        self._live: dict[str, LiveStore] = {}

    @property
    def default(self) -> LiveStore:
        return self.live(DEFAULT_COLLECTION)

    def names(self) -> list[str]:
        """The collections there are: `default` always, the others once they hold a version."""
        with self._lock:
            return [DEFAULT_COLLECTION, *sorted(name for name in self._live if name != DEFAULT_COLLECTION)]

    def describe(self) -> list[CollectionInfo]:
        """Each collection with the documents and chunks of the version it serves."""
        stores = [(name, self.live(name).store) for name in self.names()]
        return [
            CollectionInfo(name, len(store.files) if store else 0, store.size if store else 0) for name, store in stores
        ]

    def clash(self, name: str) -> str | None:
        """An existing collection that `name` would be confused with (it differs only in case or in the width of
        its characters: `Docs`, `DOCS`, `Ｄｏｃｓ`), None when there is none or `name` is that collection.
        On a case-insensitive disk two such names would also share one folder."""
        folded = _folded(name)
        return next((known for known in self.names() if known != name and _folded(known) == folded), None)

    def live(self, name: str) -> LiveStore:
        """The live store of an existing collection; CollectionNotFoundError lists the known ones."""
        with self._lock:
            live = self._live.get(name)
        if live is None and COLLECTION_NAME.fullmatch(name) and store_exists(collection_path(self.store_root, name)):
            live = self.reload(name)  # made meanwhile by `scripts/ingest.py --collection`
        if live is None:
            known = ", ".join(self.names())
            raise CollectionNotFoundError(f"no collection {name[:80]!r}; collections: {known}")
        return live

    def reload_all(self) -> None:
        """Load every collection on disk (the default one even when empty, so its load error can be reported)."""
        names = [DEFAULT_COLLECTION]
        folder = self.store_root / COLLECTIONS_FOLDER
        if folder.is_dir():
            names += sorted(
                path.name for path in folder.iterdir()
                if COLLECTION_NAME.fullmatch(path.name) and path.name != DEFAULT_COLLECTION and store_exists(path)
            )
        for name in names:
            self.reload(name)

    def reload(self, name: str) -> LiveStore:
        """Load the live version of collection `name` (known or new, e.g. after its first ingestion) and serve it."""
        live = self._entry(name)
        live.reload()
        return live

    def serve_live_version(self, name: str) -> VectorStore:
        """Serve the version just written to collection `name`; VectorStoreError when it cannot be loaded."""
        return self._entry(name).serve_live_version()

    def _entry(self, name: str) -> LiveStore:
        with self._lock:
            live = self._live.get(name)
            if live is None:
                live = LiveStore(self.embedder, collection_path(self.store_root, name))
                self._live[name] = live
            return live
