"""The FAISS store: each collection a folder of immutable, verified versions on this machine (`vector_store`).

The `default` collection is the store in VECTOR_STORE_PATH itself (as before collections existed, so existing
stores keep working); each other collection is a store of its own in `collections/<name>/`, with its own
versions, manifest, BM25 index and ingestion lock. A change writes a whole new version (unchanged documents keep
their stored vectors) and names it live atomically; a crash leaves the previous version live.
"""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from app.errors import ConflictError
from app.rag.embeddings import Embedder
from app.rag.stores.base import (
    COLLECTION_NAME,
    DEFAULT_COLLECTION,
    CollectionStore,
    NewDocument,
    StoreBackend,
    StoreView,
    check_collection_name,
)
from app.rag.vector_store import (
    CURRENT_FILE,
    FileEntry,
    StoredChunk,
    VectorStore,
    build_index,
    current_version,
    kept_versions,
    load_store,
    load_version,
    rewrite_version,
    store_exists,
    write_store,
)

COLLECTIONS_FOLDER = "collections"
LOCK_FILE = ".ingest.lock"


def collection_path(store_root: Path, name: str) -> Path:
    """The store folder of collection `name` (checked) under VECTOR_STORE_PATH."""
    check_collection_name(name)
    return store_root if name == DEFAULT_COLLECTION else store_root / COLLECTIONS_FOLDER / name


@contextmanager
def ingestion_lock(store_path: Path) -> Iterator[None]:
    """One writer at a time per store folder, across processes (a server and `scripts/ingest.py`); a second one
    gets ConflictError at once instead of waiting."""
    store_path.mkdir(parents=True, exist_ok=True)
    with (store_path / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError("another ingestion is writing this vector store; try again when it ends") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FaissCollection(CollectionStore):
    kind: ClassVar[str] = "faiss"

    def __init__(self, embedder: Embedder, name: str, path: Path) -> None:
        super().__init__(embedder, name)
        self.path = path

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def store(self) -> VectorStore | None:
        return self._store if isinstance(self._store, VectorStore) else None

    def exists(self) -> bool:
        return store_exists(self.path)

    def read(self, check_embedder: bool = True) -> VectorStore | None:
        if not os.path.lexists(self.path / CURRENT_FILE):
            return None  # an unusable CURRENT is not "none": `load_store` says what is wrong with it
        return load_store(self.path, expected_embedding_model=self.embedder.name if check_embedder else None)

    def writing(self) -> AbstractContextManager[None]:
        return ingestion_lock(self.path)

    def apply(
        self, previous: StoreView | None, documents: list[NewDocument], removed: Collection[str], *,
        replace: bool = False,
    ) -> str:
        # A version is written whole: what it keeps is only ever what `previous` holds.
        replaced = set(removed) | {document.source for document in documents}
        kept = _KeptChunks(previous if isinstance(previous, VectorStore) and not replace else None)
        for name, entry in (previous.files if previous is not None and not replace else {}).items():
            if name not in replaced:
                kept.keep(name, entry)
        for document in documents:
            kept.add(document.source, document.sha256, document.chunks, document.vectors, document.ingested_at)
        store = VectorStore(kept.index(self.embedder.dimension), kept.chunks, kept.files, self.embedder.name)
        return write_store(self.path, store)

    def purge_kept_versions(self, source: str, sha256: str) -> list[str]:
        live, purged = current_version(self.path), []
        for version in kept_versions(self.path):
            if version == live:
                continue
            # A kept version that cannot be read raises VectorStoreError: the purge stops and says which (the
            # document is not removed from what is unread).
            old = load_version(self.path, version)
            entry = old.files.get(source)
            if entry is None or entry.sha256 != sha256:
                continue
            kept = _KeptChunks(old)
            for name, other in old.files.items():
                if name != source:
                    kept.keep(name, other)
            index = kept.index(functools.partial(int, old.index.d))  # its own width, even when left empty
            rewrite_version(self.path, VectorStore(index, kept.chunks, kept.files, old.embedding_model,
                                                   version=version, created_at=old.created_at))
            purged.append(version)
        return purged


class _KeptChunks:
    """The next version's content, assembled document by document; kept documents reuse their stored vectors."""

    def __init__(self, previous: VectorStore | None) -> None:
        self._previous = previous
        self.chunks: list[StoredChunk] = []
        self.files: dict[str, FileEntry] = {}
        self._vectors: list[np.ndarray] = []

    def keep(self, name: str, entry: FileEntry) -> None:
        assert self._previous is not None
        chunks = [self._previous.chunks[i] for i in entry.chunk_ids]
        self.add(name, entry.sha256, chunks, self._previous.vectors(entry.chunk_ids), entry.ingested_at)

    def add(self, name: str, sha256: str, chunks: list[StoredChunk], vectors: np.ndarray, ingested_at: str) -> None:
        ids = list(range(len(self.chunks), len(self.chunks) + len(chunks)))
        self.files[name] = FileEntry(sha256, ids, ingested_at)
        self.chunks.extend(chunks)
        self._vectors.append(vectors)

    def index(self, dimension_when_empty: Callable[[], int]) -> Any:
        if not self.chunks:
            dimension = dimension_when_empty()
            return build_index(np.zeros((0, dimension), np.float32), dimension)
        vectors = np.concatenate(self._vectors)
        return build_index(vectors, int(vectors.shape[1]))


class FaissBackend(StoreBackend):
    kind: ClassVar[str] = "faiss"

    def __init__(self, embedder: Embedder, root: Path) -> None:
        super().__init__(embedder)
        self.root = root

    @property
    def location(self) -> str:
        return str(self.root)

    def collection(self, name: str) -> FaissCollection:
        return FaissCollection(self.embedder, name, collection_path(self.root, name))

    def collection_names(self) -> list[str]:
        folder = self.root / COLLECTIONS_FOLDER
        others = sorted(
            path.name for path in folder.iterdir()
            if COLLECTION_NAME.fullmatch(path.name) and path.name != DEFAULT_COLLECTION and store_exists(path)
        ) if folder.is_dir() else []
        return [DEFAULT_COLLECTION, *others] if store_exists(self.root) else others
