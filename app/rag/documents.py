"""Documents managed while the service runs: add one file to a collection, list them, delete one.

A document is one file of a collection's store (its chunks in both indexes). Adding or deleting one writes a
new store version under the collection's ingestion lock and serves it at once, so the next question sees it.
Uploads through this service wait for each other (one thread at a time); a `scripts/ingest.py` run writing the
same collection meanwhile makes them fail with 409 instead of waiting on it.

An upload is checked before anything is written: its name is one plain file name with a supported suffix,
and its bytes are what the suffix says (a PDF starts with `%PDF-`; a text or HTML file decodes as text and
holds no binary), so a renamed image or archive is refused rather than indexed as noise. Its text is read in a
child process within MAX_DOCUMENT_CHARS, UPLOAD_PARSE_SECONDS and UPLOAD_PARSE_MB (app/rag/extraction.py), it
may make at most MAX_DOCUMENT_CHUNKS chunks, and an upload whose client leaves is abandoned: nothing is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import unicodedata
from dataclasses import dataclass, replace
from pathlib import PurePath

import anyio

from app.config import Settings
from app.errors import (
    AppError,
    BadRequestError,
    ConflictError,
    DocumentTooLargeError,
    NotFoundError,
    UnreadableDocumentError,
)
from app.rag.collections import CollectionInfo, Collections, check_collection_name
from app.rag.extraction import ExtractionLimits, read_bounded
from app.rag.ingestion import DocumentChange, IngestionAbandonedError, add_document, remove_document
from app.rag.loaders import SUPPORTED_SUFFIXES
from app.rag.service import is_blank

logger = logging.getLogger(__name__)

MAX_FILE_NAME_CHARS = 255
_SNIFF_BYTES = 8192
# Signatures of common binary formats, to name what an upload really is.
_BINARY_SIGNATURES = {
    b"PK\x03\x04": "a ZIP archive (or an Office document)",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"\x7fELF": "a program (ELF)",
    b"\x1f\x8b": "a gzip archive",
    b"MZ": "a Windows program",
}


class InvalidFileNameError(BadRequestError):
    code = "invalid_file_name"


class EmptyDocumentError(BadRequestError):
    code = "empty_document"


class UnsupportedDocumentError(AppError):
    """Not a kind of document this service reads."""

    status_code = 415
    code = "unsupported_media_type"


class DocumentNotFoundError(NotFoundError):
    code = "document_not_found"


@dataclass(frozen=True)
class DocumentInfo:
    document_id: str
    source: str
    collection: str
    chunks: int
    ingested_at: str
    purged_versions: tuple[str, ...] = ()  # after a purging delete: the kept versions rewritten without it


def document_id(collection: str, source: str, sha256: str) -> str:
    """Stable for the same content under the same name in the same collection, so uploading a file twice
    gives the same id, and a document's id says which collection it is in without a lookup table."""
    return hashlib.sha256(f"{collection}\n{source}\n{sha256}".encode()).hexdigest()[:32]


def checked_file_name(name: str) -> str:
    """An upload's file name (NFC: the same name typed on any system is one name) when it is one plain name of a
    supported kind; else InvalidFileNameError or UnsupportedDocumentError saying why."""
    name = unicodedata.normalize("NFC", name)
    if not name or is_blank(name):
        raise InvalidFileNameError("the uploaded file has no name: send it as multipart field `file` with a filename")
    if "/" in name or "\\" in name or name in (".", "..") or PurePath(name).name != name:
        raise InvalidFileNameError(f"file name {name[:80]!r} has path parts: send the file's own name only")
    if name.startswith(".") or any(unicodedata.category(char) in ("Cc", "Cf") for char in name):
        raise InvalidFileNameError(f"file name {name[:80]!r} is hidden or holds control characters")
    if len(name) > MAX_FILE_NAME_CHARS:
        raise InvalidFileNameError(f"file name is {len(name)} characters; the limit is {MAX_FILE_NAME_CHARS}")
    if PurePath(name).suffix.lower() not in SUPPORTED_SUFFIXES:
        raise UnsupportedDocumentError(
            f"{name[:80]!r} is not a supported document: allowed: {', '.join(sorted(SUPPORTED_SUFFIXES))}"
        )
    return name


async def extract_text(name: str, data: bytes, limits: ExtractionLimits) -> str:
    """The text of an upload after checking that its bytes are what its name says; refused with the error
    that says what is wrong (empty, another kind of file, unreadable, over a bound)."""
    _check_kind(name, data)
    text = await read_bounded(name, data, limits)  # a plain name: only its suffix is read
    if is_blank(text):
        scan = " (a scanned PDF has images, not text)" if PurePath(name).suffix.lower() == ".pdf" else ""
        raise UnreadableDocumentError(f"{name} holds no text to index{scan}")
    return text


def _check_kind(name: str, data: bytes) -> None:
    """UnsupportedDocumentError (or EmptyDocumentError) unless the bytes are what the name says."""
    if not data:
        raise EmptyDocumentError(f"{name} is empty")
    head = data[:_SNIFF_BYTES]
    suffix = PurePath(name).suffix.lower()
    # A PDF reader finds the header within the first 1024 bytes; a file of another name is a PDF only when it
    # starts with one (a text may mention %PDF-).
    is_pdf_name = suffix == ".pdf"
    if is_pdf_name and b"%PDF-" not in head[:1024]:
        raise UnsupportedDocumentError(f"{name} is {_binary_kind(head) or 'not a PDF (it has no %PDF- header)'}")
    if not is_pdf_name and head.lstrip().startswith(b"%PDF-"):
        raise UnsupportedDocumentError(f"{name} is a PDF, but its name ends in {suffix}: name it .pdf")
    if not is_pdf_name:
        kind = _binary_kind(head)
        if kind is not None or b"\0" in head:
            detail = kind or "binary (it holds NUL bytes; a UTF-16 text file: save it as UTF-8)"
            raise UnsupportedDocumentError(f"{name} is {detail}, not text or HTML")
        if not _decodes_as_text(data):
            raise UnsupportedDocumentError(f"{name} is not text in UTF-8 or GB18030")


def _binary_kind(head: bytes) -> str | None:
    return next((kind for signature, kind in _BINARY_SIGNATURES.items() if head.startswith(signature)), None)


def _decodes_as_text(data: bytes) -> bool:
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        # Control characters other than whitespace mark a binary file that happens to decode.
        controls = sum(1 for char in text[:_SNIFF_BYTES] if unicodedata.category(char) == "Cc" and not char.isspace())
        return controls <= len(text[:_SNIFF_BYTES]) // 100
    return False


class DocumentService:
    def __init__(self, settings: Settings, collections: Collections) -> None:
        self._settings = settings
        self._collections = collections
        # One document change at a time; the others wait their turn here, on the event loop, not in worker threads.
        self._writing = asyncio.Lock()

    async def add(self, file_name: str, data: bytes, collection: str) -> tuple[DocumentInfo, bool]:
        """Index one uploaded file in `collection` (created by its first document); searchable on return.
        Returns the document and whether it is new (False: the same content was there already)."""
        collection = check_collection_name(unicodedata.normalize("NFC", collection))
        existing = await anyio.to_thread.run_sync(self._collections.clash, collection)  # Milvus: a call
        if existing is not None:
            raise ConflictError(
                f"collection {collection!r} looks like the existing collection {existing!r} (it differs only in "
                f"case, character width or look-alike characters): upload into {existing!r}, or choose a clearly "
                "different name"
            )
        name = checked_file_name(file_name)
        limit = self._settings.max_upload_mb
        if len(data) > limit * 1024 * 1024:
            size = len(data) / 1024 / 1024
            raise DocumentTooLargeError(f"{name} is {size:.1f} MB; the limit is MAX_UPLOAD_MB={limit:g}")
        settings = self._settings
        limits = ExtractionLimits(settings.max_document_chars, settings.upload_parse_seconds, settings.upload_parse_mb)
        text = await extract_text(name, data, limits)
        sha256 = await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
        async with self._writing:
            change = await self._add_unless_abandoned(collection, name, text, sha256)
        if change.written:
            logger.info("document %s added to collection %s (%d chunks, version %s)",
                        name, collection, change.chunks, change.version or "-")
        return self._info(collection, change.source, change.sha256, change.chunks, change.ingested_at), change.written

    def _documents(self, collection: str | None) -> list[DocumentInfo]:
        documents = []
        for name in [collection] if collection is not None else self._collections.names():
            store = self._collections.served(name)
            if store is not None:
                documents += [
                    self._info(name, source, entry.sha256, len(entry.chunk_ids), entry.ingested_at or store.created_at)
                    for source, entry in store.files.items()
                ]
        return documents

    async def collections(self) -> list[CollectionInfo]:
        return await anyio.to_thread.run_sync(self._collections.describe)  # Milvus: calls over the network

    async def list(self, collection: str | None) -> list[DocumentInfo]:
        """The documents of `collection`, or of every collection, as the views being served hold them."""
        return await anyio.to_thread.run_sync(self._documents, collection)  # Milvus: a scan per collection

    async def delete(self, document: str, purge: bool = False) -> DocumentInfo:
        """Take a document's chunks out of both indexes of its collection; with `purge`, out of the versions kept for
        rollback as well."""
        found = await anyio.to_thread.run_sync(self._find, document)
        if found is None:
            raise DocumentNotFoundError(f"no document {document[:80]!r}")
        collection, source, sha256, created_at = found
        async with self._writing:
            change = await anyio.to_thread.run_sync(self._remove, collection, source, sha256, purge)
        logger.info("document %s deleted from collection %s (version %s; kept versions purged: %s)", source,
                    collection, change.version or "-", ", ".join(change.purged_versions) or "none")
        info = self._info(collection, source, sha256, change.chunks, change.ingested_at or created_at)
        return replace(info, purged_versions=change.purged_versions)

    def _find(self, document: str) -> tuple[str, str, str, str] | None:
        """(collection, source, sha256, its version's creation time) of the document with that id."""
        for collection in self._collections.names():
            store = self._collections.served(collection)
            for source, entry in (store.files if store is not None else {}).items():
                if document_id(collection, source, entry.sha256) == document:
                    return collection, source, entry.sha256, store.created_at if store is not None else ""
        return None

    async def _add_unless_abandoned(self, collection: str, name: str, text: str, sha256: str) -> DocumentChange:
        """`_add` in a worker thread. Cancelled (its client left), the thread is told to write nothing and waited
        for, so the next upload finds the collection's writing lock free."""
        abandoned = threading.Event()
        work = asyncio.ensure_future(
            anyio.to_thread.run_sync(self._add, collection, name, text, sha256, abandoned)
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            abandoned.set()
            with contextlib.suppress(IngestionAbandonedError, AppError):
                change = await work
                if change.written:  # the version was written before the client left: it stays, as any other
                    logger.info("document %s was added to %s as its client left", name, collection)
            raise

    def _add(self, collection: str, name: str, text: str, sha256: str, abandoned: threading.Event) -> DocumentChange:
        settings = self._settings
        change = add_document(
            self._collections.store(collection), name, text, sha256,
            chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap,
            max_chunks=settings.max_document_chunks, abandoned=abandoned,
        )
        if change.written:
            self._serve(collection)
        return change

    def _remove(self, collection: str, source: str, sha256: str, purge: bool) -> DocumentChange:
        try:
            change = remove_document(self._collections.store(collection), source, sha256, purge)
        except NotFoundError:
            raise DocumentNotFoundError(
                f"document {source!r} is no longer in collection {collection} with that content"
            ) from None
        self._serve(collection)
        return change

    def _serve(self, collection: str) -> None:
        self._collections.serve_live_version(collection)

    @staticmethod
    def _info(collection: str, source: str, sha256: str, chunks: int, ingested_at: str) -> DocumentInfo:
        return DocumentInfo(
            document_id=document_id(collection, source, sha256), source=source, collection=collection, chunks=chunks,
            ingested_at=ingested_at,
        )
