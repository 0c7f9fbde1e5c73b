"""Build or update the vector store from a folder of documents.

Unchanged files (same sha256) keep their chunks and stored vectors; changed and new files are chunked
and embedded; files gone from the folder are dropped. The result is written as a new store version.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from app.config import Settings
from app.errors import BadRequestError, ConflictError, NotFoundError, VectorStoreError
from app.rag.chunking import chunk_text
from app.rag.collections import DEFAULT_COLLECTION, collection_path
from app.rag.embeddings import EMBED_BATCH_SIZE, Embedder, create_embedder
from app.rag.loaders import SUPPORTED_SUFFIXES, DocumentReadError, read_document
from app.rag.vector_store import (
    FileEntry,
    StoredChunk,
    VectorStore,
    build_index,
    load_store,
    store_exists,
    switch_version,
    write_store,
)

logger = logging.getLogger(__name__)

LOCK_FILE = ".ingest.lock"


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    other_sources: set[str] = field(default_factory=set)  # top folders of files ingested from elsewhere
    failed: dict[str, str] = field(default_factory=dict)
    chunks_embedded: int = 0
    chunk_count: int = 0
    version: str | None = None
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


@contextmanager
def ingestion_lock(store_path: Path) -> Iterator[None]:
    """One ingestion at a time per store; a second one gets ConflictError at once instead of waiting."""
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


def find_documents(source: Path) -> list[Path]:
    """Supported files under `source`, hidden files and folders skipped, in a stable order."""
    return sorted(
        path
        for path in source.rglob("*")
        if path.is_file()
        and path.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(source).parts)
    )


def _source_name(source: Path, path: Path) -> str:
    """The `source` metadata: the path under the ingested folder, prefixed with that folder's name
    (`docs/guide/api.md`), so answers can cite files the way a user sees them."""
    return (Path(source.resolve().name) / path.relative_to(source)).as_posix()


class _KeptChunks:
    """The next store's content, assembled file by file; unchanged files reuse their stored vectors."""

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


def _split(vectors: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(vectors, np.cumsum(sizes)[:-1]) if sizes else []


@dataclass
class _Pending:
    """A file whose chunks are new and still need vectors."""

    source: str
    sha256: str
    chunks: list[StoredChunk]


def ingest_folder(
    source: Path,
    store_path: Path,
    embedder: Embedder,
    *,
    chunk_size: int,
    chunk_overlap: int,
    rebuild: bool = False,
    show_progress: bool = True,
) -> IngestReport:
    if not source.is_dir():
        raise BadRequestError(f"the document folder '{source}' does not exist or is not a folder")
    started = time.perf_counter()
    report = IngestReport()
    with ingestion_lock(store_path):
        previous = _previous_store(store_path, embedder.name, rebuild)
        prefix = _source_name(source, source / "x").removesuffix("x")
        kept = _KeptChunks(previous)
        pending: list[_Pending] = []
        documents = find_documents(source)
        for path in tqdm(documents, desc="reading documents", unit="file", disable=not show_progress):
            name = _source_name(source, path)
            try:
                data = path.read_bytes()
            except OSError as error:
                report.failed[name] = f"cannot read it ({error.strerror})"
                continue
            digest = hashlib.sha256(data).hexdigest()
            old_entry = previous.files.get(name) if previous else None
            if old_entry and old_entry.sha256 == digest:
                kept.keep(name, old_entry)
                report.unchanged.append(name)
                continue
            try:
                text = read_document(path, data)
            except DocumentReadError as error:
                report.failed[name] = str(error)
                logger.warning("skipped %s: %s", name, error)
                continue
            chunks = _chunks_of(name, text, chunk_size, chunk_overlap)
            pending.append(_Pending(name, digest, chunks))
            (report.updated if old_entry else report.added).append(name)
        seen = {_source_name(source, path) for path in documents}
        if rebuild:
            # Documents from elsewhere (uploads, other folders) cannot be read again from this folder: their stored
            # chunks are embedded again, with the embedder of this run, so a rebuild loses none of them.
            for name, (digest, chunks) in _other_documents(store_path, prefix).items():
                pending.append(_Pending(name, digest, chunks))
                report.other_sources.add(_origin(name))
        elif previous is not None:
            # Files ingested from other folders stay; only this folder's vanished files are dropped.
            for name, entry in previous.files.items():
                if not name.startswith(prefix):
                    kept.keep(name, entry)
                    report.other_sources.add(_origin(name))
                elif name not in seen:
                    report.removed.append(name)
        report.removed.sort()

        if previous is not None and not report.changed and not report.failed:
            report.version, report.chunk_count = previous.version, previous.size
            report.seconds = time.perf_counter() - started
            return report

        new_vectors = _embed_pending(embedder, pending, show_progress)
        now = _now()
        for item, vectors in zip(pending, _split(new_vectors, [len(item.chunks) for item in pending]), strict=True):
            kept.add(item.source, item.sha256, item.chunks, vectors, now)
        report.version = _write(store_path, kept, embedder)
        report.chunks_embedded = len(new_vectors)
        report.chunk_count = len(kept.chunks)
    report.seconds = time.perf_counter() - started
    return report


def _origin(source: str) -> str:
    """Where a document came from, for reports: its folder (`docs/`), or `uploads` (POST /documents: a name only)."""
    return source.split("/", 1)[0] + "/" if "/" in source else "uploads"


def _other_documents(store_path: Path, prefix: str) -> dict[str, tuple[str, list[StoredChunk]]]:
    """The live version's documents not under `prefix`, as (sha256, chunks), whichever embedder made it; none
    when there is no readable live version."""
    if not store_exists(store_path):
        return {}
    try:
        store = load_store(store_path)
    except VectorStoreError as error:
        logger.warning("the documents of the previous version cannot be kept: %s", error.message)
        return {}
    return {
        name: (entry.sha256, [store.chunks[i] for i in entry.chunk_ids])
        for name, entry in store.files.items() if not name.startswith(prefix)
    }


def _chunks_of(source: str, text: str, chunk_size: int, chunk_overlap: int) -> list[StoredChunk]:
    return [
        StoredChunk(text=c.text, metadata={"source": source, "chunk_index": c.index, "start_char": c.start})
        for c in chunk_text(text, chunk_size, chunk_overlap)
    ]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write(store_path: Path, kept: _KeptChunks, embedder: Embedder) -> str:
    store = VectorStore(kept.index(lambda: _dimension(embedder)), kept.chunks, kept.files, embedder.name)
    return write_store(store_path, store)


@dataclass(frozen=True)
class DocumentChange:
    """What adding or removing one document did to a store."""

    source: str
    entry: FileEntry
    version: str  # the version now live (a new one, or the same when nothing changed)
    written: bool  # False: nothing was written (a document with the same content was there already)


def add_document(
    store_path: Path, embedder: Embedder, source: str, text: str, sha256: str, *, chunk_size: int, chunk_overlap: int
) -> DocumentChange:
    """Add one document's text as `source` in a new version (a document of that name is replaced). The same
    content already in the store, under any name, is not added twice: that document is returned unchanged."""
    with ingestion_lock(store_path):
        previous = _live_store(store_path, embedder.name)
        files = previous.files if previous is not None else {}
        same = next((name for name, entry in files.items() if entry.sha256 == sha256), None)
        if same is not None and previous is not None:
            if same == source or source not in files:
                return DocumentChange(same, files[same], previous.version, written=False)
            raise ConflictError(
                f"this content is already in the collection as {same}, and {source} holds other content: delete "
                f"one of them first, or upload it under another name"
            )
        chunks = _chunks_of(source, text, chunk_size, chunk_overlap)
        if not chunks:
            raise BadRequestError(f"{source} holds no text to index")
        kept = _all_but(previous, source)
        kept.add(source, sha256, chunks, _embed_pending(embedder, [_Pending(source, sha256, chunks)], False), _now())
        version = _write(store_path, kept, embedder)
        return DocumentChange(source, kept.files[source], version, written=True)


def remove_document(store_path: Path, embedder: Embedder, source: str, sha256: str) -> DocumentChange:
    """Write a new version without document `source` holding content `sha256`; NotFoundError when the live
    version does not hold that (a document replaced under the same name meanwhile is not removed)."""
    with ingestion_lock(store_path):
        previous = _live_store(store_path, embedder.name)
        if previous is None or source not in previous.files or previous.files[source].sha256 != sha256:
            raise NotFoundError(f"no document {source!r} with that content in this collection")
        kept = _all_but(previous, source)
        version = _write(store_path, kept, embedder)
        return DocumentChange(source, previous.files[source], version, written=True)


def _all_but(previous: VectorStore | None, source: str) -> _KeptChunks:
    """Every document of `previous` but `source`, with its stored vectors."""
    kept = _KeptChunks(previous)
    for name, entry in (previous.files if previous is not None else {}).items():
        if name != source:
            kept.keep(name, entry)
    return kept


def _live_store(store_path: Path, embedding_model: str) -> VectorStore | None:
    """The live version to change one document in; None for a new store. Unlike a folder's ingestion, which
    reads every file again, one document cannot rebuild the others: an unreadable live version is an error."""
    return load_store(store_path, expected_embedding_model=embedding_model) if store_exists(store_path) else None


def _previous_store(store_path: Path, embedding_model: str, rebuild: bool) -> VectorStore | None:
    if rebuild or not store_exists(store_path):
        return None
    try:
        return load_store(store_path, expected_embedding_model=embedding_model)
    except VectorStoreError as error:
        logger.warning("rebuilding the vector store from scratch: %s", error.message)
        return None


def _embed_pending(embedder: Embedder, pending: list[_Pending], show_progress: bool) -> np.ndarray:
    texts = [chunk.text for item in pending for chunk in item.chunks]
    batches = []
    with tqdm(total=len(texts), desc="embedding chunks", unit="chunk", disable=not show_progress) as bar:
        for start in range(0, len(texts), EMBED_BATCH_SIZE):
            batch = texts[start : start + EMBED_BATCH_SIZE]
            batches.append(embedder.embed(batch))
            bar.update(len(batch))
    return np.concatenate(batches) if batches else np.zeros((0, _dimension(embedder)), np.float32)


def _dimension(embedder: Embedder) -> int:
    return int(embedder.embed(["dimension probe"]).shape[1])


def ingest_with_settings(
    settings: Settings,
    source: Path,
    *,
    rebuild: bool = False,
    show_progress: bool = True,
    embedder: Embedder | None = None,
    collection: str = DEFAULT_COLLECTION,
) -> IngestReport:
    """Ingest `source` into `collection` under VECTOR_STORE_PATH with the configured chunking and embedder
    (`embedder`: one already loaded, such as the running server's; None: load the configured one)."""
    return ingest_folder(
        source,
        collection_path(settings.vector_store_path, collection),
        embedder or create_embedder(settings),
        chunk_size=settings.chunk_size,
        chunk_overlap=settings.chunk_overlap,
        rebuild=rebuild,
        show_progress=show_progress,
    )


def roll_back(store_path: Path, version: str, embedding_model: str) -> VectorStore:
    """Make a kept version live again, verified first; under the ingestion lock, so no ingestion
    switches or prunes versions meanwhile (one running: ConflictError)."""
    with ingestion_lock(store_path):
        return switch_version(store_path, version, expected_embedding_model=embedding_model)
