"""Build or update a collection from a folder of documents, or change one document in it.

Unchanged files (same sha256) keep their chunks and stored vectors; changed and new files are chunked
and embedded; files gone from the folder are dropped. What changed is applied to the collection's store
(`stores`: a new FAISS version, or rows in Milvus) under its one-writer lock.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from app.config import Settings
from app.errors import BadRequestError, ConflictError, DocumentTooLargeError, NotFoundError, VectorStoreError
from app.rag.chunking import chunk_text
from app.rag.embeddings import EMBED_BATCH_SIZE, DeferredEmbedder, Embedder, create_embedder
from app.rag.loaders import SUPPORTED_SUFFIXES, DocumentReadError, read_document
from app.rag.stores.base import DEFAULT_COLLECTION, CollectionStore, NewDocument, StoreUnavailableError, StoreView
from app.rag.stores.registry import create_store_backend
from app.rag.vector_store import FileEntry, StoredChunk

logger = logging.getLogger(__name__)


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
    version: str | None = None  # "" where the store keeps no versions
    location: str = ""  # the collection's folder or URI
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


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
    store: CollectionStore,
    *,
    chunk_size: int,
    chunk_overlap: int,
    rebuild: bool = False,
    show_progress: bool = True,
) -> IngestReport:
    if not source.is_dir():
        raise BadRequestError(f"the document folder '{source}' does not exist or is not a folder")
    started = time.perf_counter()
    report = IngestReport(location=store.location)
    with store.writing():
        previous = _previous_store(store, rebuild)
        # Read once: on Milvus each reading is a scan of the collection.
        previous_files = dict(previous.files) if previous is not None else {}
        prefix = _source_name(source, source / "x").removesuffix("x")
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
            old_entry = previous_files.get(name)
            if old_entry and old_entry.sha256 == digest:
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
        if previous is None:
            # Documents from elsewhere (uploads, other folders) cannot be read again from this folder: their stored
            # chunks are embedded again, with the embedder of this run, so a rebuild loses none of them.
            for name, (digest, chunks) in _other_documents(store, prefix).items():
                pending.append(_Pending(name, digest, chunks))
                report.other_sources.add(_origin(name))
        else:
            # Files ingested from other folders stay; only this folder's vanished files are dropped.
            for name in previous_files:
                if not name.startswith(prefix):
                    report.other_sources.add(_origin(name))
                elif name not in seen:
                    report.removed.append(name)
        report.removed.sort()

        if previous is not None and not report.changed and not report.failed:
            report.version = previous.version
            report.chunk_count = sum(len(entry.chunk_ids) for entry in previous_files.values())
            report.seconds = time.perf_counter() - started
            return report

        new_documents = _embedded(store.embedder, pending, show_progress)
        report.version = store.apply(previous, new_documents, report.removed, replace=previous is None)
        report.chunks_embedded = sum(len(document.chunks) for document in new_documents)
        report.chunk_count = _size_after(previous_files, new_documents, report.removed)
    report.seconds = time.perf_counter() - started
    return report


def _size_after(previous_files: Mapping[str, FileEntry], documents: list[NewDocument], removed: list[str]) -> int:
    """Chunks in the collection after a change, counted from what was applied (reading it back would load a
    FAISS version twice, or scan a Milvus collection once more)."""
    replaced = set(removed) | {document.source for document in documents}
    kept = sum(len(entry.chunk_ids) for name, entry in previous_files.items() if name not in replaced)
    return kept + sum(len(document.chunks) for document in documents)


def _origin(source: str) -> str:
    """Where a document came from, for reports: its folder (`docs/`), or `uploads` (POST /documents: a name only)."""
    return source.split("/", 1)[0] + "/" if "/" in source else "uploads"


def _other_documents(store: CollectionStore, prefix: str) -> dict[str, tuple[str, list[StoredChunk]]]:
    """The live content's documents not under `prefix`, as (sha256, chunks), whichever embedder made it; none
    when there is no readable live content."""
    try:
        live = store.read(check_embedder=False)
    except StoreUnavailableError:
        raise  # what it holds is unknown: rebuilding without its documents would lose them
    except VectorStoreError as error:
        logger.warning("the documents of the previous version cannot be kept: %s", error.message)
        return {}
    if live is None:
        return {}
    return {
        name: (entry.sha256, live.chunks_of(name)) for name, entry in live.files.items() if not name.startswith(prefix)
    }


def _chunks_of(source: str, text: str, chunk_size: int, chunk_overlap: int) -> list[StoredChunk]:
    return [
        StoredChunk(text=c.text, metadata={"source": source, "chunk_index": c.index, "start_char": c.start})
        for c in chunk_text(text, chunk_size, chunk_overlap)
    ]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class DocumentChange:
    """What adding or removing one document did to a collection."""

    source: str
    sha256: str
    chunks: int
    ingested_at: str  # "" in FAISS stores written before it was kept
    version: str  # the version now live (a new one, or the same when nothing changed; "" where none are kept)
    written: bool  # False: nothing was written (a document with the same content was there already)
    purged_versions: tuple[str, ...] = ()  # kept versions rewritten without a removed document (a purge)


class IngestionAbandonedError(Exception):
    """The caller gave the document up (its client left) before it was written; nothing was."""


def add_document(
    store: CollectionStore, source: str, text: str, sha256: str, *, chunk_size: int, chunk_overlap: int,
    max_chunks: int | None = None, abandoned: threading.Event | None = None,
) -> DocumentChange:
    """Add one document's text as `source` (a document of that name is replaced). The same content already in
    the collection, under any name, is not added twice: that document is returned unchanged. More than
    `max_chunks` chunks: DocumentTooLargeError; `abandoned` set before the new version is written:
    IngestionAbandonedError, and nothing is written."""
    with store.writing():
        previous = store.read()  # unlike a folder's ingestion, one document cannot rebuild the others: no fallback
        files = previous.files if previous is not None else {}
        same = next((name for name, entry in files.items() if entry.sha256 == sha256), None)
        if same is not None and previous is not None:
            if same == source or source not in files:
                return _change(same, files[same], previous.version, written=False)
            raise ConflictError(
                f"this content is already in the collection as {same}, and {source} holds other content: delete "
                f"one of them first, or upload it under another name"
            )
        chunks = _chunks_of(source, text, chunk_size, chunk_overlap)
        if not chunks:
            raise BadRequestError(f"{source} holds no text to index")
        if max_chunks is not None and len(chunks) > max_chunks:
            raise DocumentTooLargeError(
                f"{source} makes {len(chunks)} chunks; the limit is MAX_DOCUMENT_CHUNKS={max_chunks}"
            )
        [document] = _embedded(store.embedder, [_Pending(source, sha256, chunks)], False)
        if abandoned is not None and abandoned.is_set():
            raise IngestionAbandonedError(f"{source}: its upload was given up before it was written")
        version = store.apply(previous, [document], ())
        return DocumentChange(source, sha256, len(chunks), document.ingested_at, version, written=True)


def _change(source: str, entry: FileEntry, version: str, written: bool) -> DocumentChange:
    return DocumentChange(source, entry.sha256, len(entry.chunk_ids), entry.ingested_at, version, written)


def remove_document(store: CollectionStore, source: str, sha256: str, purge: bool = False) -> DocumentChange:
    """Remove document `source` holding content `sha256`, and with `purge` from the versions kept for rollback too;
    NotFoundError when the live content does not hold that (a document replaced under the same name meanwhile is
    not removed)."""
    with store.writing():
        previous = store.read()
        entry = previous.files.get(source) if previous is not None else None
        if previous is None or entry is None or entry.sha256 != sha256:
            raise NotFoundError(f"no document {source!r} with that content in this collection")
        version = store.apply(previous, [], [source])
        purged = tuple(store.purge_kept_versions(source, sha256)) if purge else ()
        return replace(_change(source, entry, version, written=True), purged_versions=purged)


def _previous_store(store: CollectionStore, rebuild: bool) -> StoreView | None:
    if rebuild:
        return None
    try:
        return store.read()
    except StoreUnavailableError:
        raise  # what it holds is unknown: rebuilding without its documents would lose them
    except VectorStoreError as error:
        logger.warning("rebuilding the vector store from scratch: %s", error.message)
        return None


def _embedded(embedder: Embedder, pending: list[_Pending], show_progress: bool) -> list[NewDocument]:
    texts = [chunk.text for item in pending for chunk in item.chunks]
    batches = []
    with tqdm(total=len(texts), desc="embedding chunks", unit="chunk", disable=not show_progress) as bar:
        for start in range(0, len(texts), EMBED_BATCH_SIZE):
            batch = texts[start : start + EMBED_BATCH_SIZE]
            batches.append(embedder.embed(batch))
            bar.update(len(batch))
    vectors = np.concatenate(batches) if batches else np.zeros((0, embedder.dimension() if pending else 0), np.float32)
    now = _now()
    return [
        NewDocument(item.source, item.sha256, item.chunks, part, now)
        for item, part in zip(pending, _split(vectors, [len(item.chunks) for item in pending]), strict=True)
    ]


def build_first_store(settings: Settings) -> IngestReport | None:
    """At a server's first start, the default collection from SAMPLE_CORPUS_PATH, when it holds nothing yet and
    the store is this machine's; a store that replicas share is filled by ingesting into it, never by each
    replica at its start (they would all write the same documents at once)."""
    backend = create_store_backend(settings, DeferredEmbedder(settings))
    store = backend.collection(DEFAULT_COLLECTION)
    if backend.shared or store.exists():
        return None
    logger.info("no vector store yet: building it from %s", settings.sample_corpus_path)
    return ingest_folder(settings.sample_corpus_path, store, chunk_size=settings.chunk_size,
                         chunk_overlap=settings.chunk_overlap)


def ingest_with_settings(
    settings: Settings,
    source: Path,
    *,
    rebuild: bool = False,
    show_progress: bool = True,
    collection: str = DEFAULT_COLLECTION,
) -> IngestReport:
    """Ingest `source` into `collection` of the store VECTOR_STORE_BACKEND names, with the configured chunking and
    embedder."""
    store = create_store_backend(settings, create_embedder(settings)).collection(collection)
    return ingest_folder(
        source,
        store,
        chunk_size=settings.chunk_size,
        chunk_overlap=settings.chunk_overlap,
        rebuild=rebuild,
        show_progress=show_progress,
    )
