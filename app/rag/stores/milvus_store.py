"""The Milvus store: each collection one Milvus collection, in Milvus Lite (MILVUS_URI a local `.db` path, run
in this process) or a Milvus server or cluster (an http(s) URI) that several lora-rag replicas share.

One row per chunk: `text` (analysed by jieba, lower-cased, stop words dropped, so Chinese and English both
work), `sparse` (Milvus's own BM25 function of `text`), `vector` (the chunk's normalised embedding: inner
product = cosine), `source`, `sha256`, `ingested_at` and the chunk's `metadata`. The collection's properties
keep the lora-rag name and the embedding model. Nothing is cached here: every search, listing and count asks
Milvus, so what one replica writes the next request on any replica sees.

Milvus has no versions: a change inserts the new rows first and only then deletes the rows they replace, so a
question never finds a document missing mid-update; a crash between the two leaves both (the document's next
change removes every old row, whatever its content). A rebuild drops and recreates the collection.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import string
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import grpc
import numpy as np
from bm25s.stopwords import STOPWORDS_CHINESE, STOPWORDS_EN

from app.errors import ConflictError, VectorStoreError
from app.rag.embeddings import Embedder
from app.rag.retrieval.tokenize import prepare_shared_jieba, tokenize
from app.rag.stores.base import (
    CollectionStore,
    NewDocument,
    StoreBackend,
    StoreUnavailableError,
    StoreView,
    check_collection_name,
)
from app.rag.vector_store import FileEntry, SearchHit, StoredChunk

PREFIX = "lora_rag_"
NAME_PROPERTY = "lora_rag.collection"
MODEL_PROPERTY = "lora_rag.embedding_model"
MAX_TEXT_BYTES = 65_535  # Milvus's VARCHAR limit; a chunk is CHUNK_SIZE (at most 8000) characters
MAX_SOURCE_BYTES = 4096
INSERT_BATCH = 256
QUERY_BATCH = 4096
_PUNCTUATION = set(string.punctuation) | set("，。、；：？！“”‘’（）《》【】「」『』…—·～")
# The same words our own BM25 index leaves out (see `retrieval.tokenize`), and punctuation, which Milvus Lite's
# jieba analyser keeps as tokens. "lowercase" is Milvus's filter; Milvus Lite lower-cases in its jieba analyser.
ANALYZER = {
    "tokenizer": "jieba",
    "filter": ["lowercase", {"type": "stop", "stop_words": sorted(set(STOPWORDS_EN) | set(STOPWORDS_CHINESE) |
                                                                   _PUNCTUATION)}],
}
_ROW_FIELDS = ["text", "metadata"]
T = TypeVar("T")


def milvus_collection_name(name: str) -> str:
    """The Milvus collection of lora-rag collection `name`: `lora_rag_<name>` for a name of ASCII letters and digits;
    otherwise its ASCII letters and digits plus a hash of the whole name (Milvus names are ASCII `[A-Za-z0-9_]`,
    255 at most), which cannot meet a plain one (those hold no `_`)."""
    if re.fullmatch(r"[A-Za-z0-9]+", name):
        return PREFIX + name
    readable = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:64]
    return f"{PREFIX}{readable}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def shown_uri(uri: str) -> str:
    """MILVUS_URI as messages show it: no credentials (settings refuse them; a token is never in the URI)."""
    parts = urlsplit(uri)
    return uri if parts.username is None else uri.replace(parts.netloc, parts.hostname or "", 1)


_IMPORT_LOCK = threading.Lock()
# Milvus Lite folders this process has opened: their lock is ours (its server lives as long as the process), so a
# second client here, or a reconnection, must not take it for another process's.
_OPENED_LITE: set[str] = set()


def pymilvus() -> Any:
    """The pymilvus package, imported with its own configuration from the environment turned off: at import it
    loads a `.env` found above its own folder (ours: .venv is in the repository) into os.environ and parses
    MILVUS_URI as a default connection, which fails for a Milvus Lite path. Each client here gets its URI from
    our settings; the environment is restored as it was."""
    with _IMPORT_LOCK:
        if "pymilvus" not in sys.modules:
            hidden = {"MILVUS_URI": "", "PYTHON_DOTENV_DISABLED": "1"}
            saved = {name: os.environ.get(name) for name in hidden}
            os.environ.update(hidden)
            try:
                import pymilvus as package  # noqa: F401  (imported here, under the hidden environment)
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
        return sys.modules["pymilvus"]


class _NoMvccWarning(logging.Filter):
    """Milvus Lite gives iterators no MVCC timestamp; pymilvus then warns at every listing and uses the client's
    clock, which is right for a store in this process."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "mvccTs" not in record.getMessage()


_NO_MVCC_WARNING = _NoMvccWarning()


#: what a Milvus call raises besides MilvusException when the server cannot be reached or answer
_CLIENT_ERRORS: tuple[type[Exception], ...] = (grpc.RpcError, ConnectionError, OSError, TimeoutError)


class _Milvus:
    """The client, connected on first use and again after a failure; each call's Milvus errors become
    StoreUnavailableError naming the URI (never the token)."""

    def __init__(self, uri: str, token: str, timeout: float) -> None:
        self.uri, self._token, self.timeout = uri, token, timeout
        self.is_lite = not uri.startswith(("http://", "https://"))  # a local path: Milvus Lite in this process
        self._client: Any = None
        self._lock = threading.Lock()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`MilvusClient.<method>(*args, **kwargs)`, bounded by MILVUS_TIMEOUT (pymilvus's retries included)."""
        return self.run(lambda client: getattr(client, method)(*args, timeout=self.timeout, **kwargs))

    def call_loaded(self, method: str, collection: str, *args: Any, **kwargs: Any) -> Any:
        """A search or query of `collection`, loaded first when Milvus says it is not (as after a restart of Milvus
        Lite, or after another replica recreated it)."""
        try:
            return self.call(method, collection, *args, **kwargs)
        except StoreUnavailableError as error:
            if not any(words in error.message for words in ("released", "not loaded", "load()")):
                raise
        self.call("load_collection", collection)
        return self.call(method, collection, *args, **kwargs)

    def run(self, operation: Callable[[Any], T]) -> T:
        milvus_exception = pymilvus().MilvusException
        try:
            return operation(self._connected())
        except milvus_exception as error:
            self._client = None  # connect again next time: the server may be back
            raise StoreUnavailableError(f"Milvus at {shown_uri(self.uri)}: {error.message}") from None
        except _CLIENT_ERRORS as error:  # grpc and connection errors that pymilvus lets through
            self._client = None
            raise StoreUnavailableError(
                f"Milvus at {shown_uri(self.uri)} is unreachable ({type(error).__name__}: {str(error)[:200]})"
            ) from None

    def _connected(self) -> Any:
        with self._lock:
            if self._client is None:
                folder = os.path.abspath(self.uri)
                if self.is_lite and folder not in _OPENED_LITE:
                    logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(_NO_MVCC_WARNING)
                    _check_lite_folder_free(self.uri)
                    prepare_shared_jieba()  # Milvus Lite analyses text with it in this process
                try:
                    self._client = pymilvus().MilvusClient(uri=self.uri, token=self._token, timeout=self.timeout)
                except _CLIENT_ERRORS as error:
                    raise StoreUnavailableError(_connect_failure(self.uri, error)) from None
                if self.is_lite:
                    _OPENED_LITE.add(folder)
            return self._client


def _connect_failure(uri: str, error: Exception) -> str:
    message = getattr(error, "message", None) or str(error)
    return f"Milvus at {shown_uri(uri)} is unreachable: {message[:300]}"


def _check_lite_folder_free(path: str) -> None:
    """StoreUnavailableError, saying what to do, when another process has the Milvus Lite folder open: it takes
    a lock on the folder, and opening it anyway fails with a logged traceback and a bare "open failed"."""
    from milvus_lite.db import LOCK_FILENAME

    lock = Path(path) / LOCK_FILENAME
    if not lock.is_file():
        return
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreUnavailableError(
                f"Milvus Lite at {path} is open in another process (a running server?), and one process at a time "
                "can open it: upload through POST /documents, or run it as a server (`milvus-lite server "
                f"--data-dir {path} --host 127.0.0.1`) and point every process at MILVUS_URI=http://127.0.0.1:19530"
            ) from None
        fcntl.flock(handle, fcntl.LOCK_UN)


class MilvusView:
    """A Milvus collection's content, read live at each call."""

    version = ""
    created_at = ""

    def __init__(self, milvus: _Milvus, collection: str, embedding_model: str) -> None:
        self._milvus, self._collection = milvus, collection
        self.embedding_model = embedding_model

    @property
    def size(self) -> int:
        rows = self._milvus.call_loaded("query", self._collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    @property
    def files(self) -> Mapping[str, FileEntry]:
        """Each document's content hash, its rows' ids and when it was written. A document whose rows are not one
        whole write (a write cut short, or two replicas writing it at once) has the hash "": an ingestion then
        takes it as changed and replaces every row it has."""
        rows: dict[str, list[dict[str, Any]]] = {}
        for row in self._rows("", ["source", "sha256", "ingested_at", "document_chunks"]):
            rows.setdefault(str(row["source"]), []).append(row)
        files = {}
        for source, held in rows.items():
            writes = {(row["sha256"], row["ingested_at"], row["document_chunks"]) for row in held}
            sha256, ingested_at, chunks = next(iter(writes))
            whole = len(writes) == 1 and int(chunks) == len(held)
            files[source] = FileEntry(str(sha256) if whole else "", sorted(int(row["id"]) for row in held),
                                      str(ingested_at))
        return files

    def search(self, query_vector: np.ndarray, k: int) -> list[SearchHit]:
        data = [np.asarray(query_vector, dtype=np.float32).reshape(-1).tolist()]
        return [
            SearchHit(int(hit["id"]), _chunk(hit["entity"]), float(hit["distance"]), "cosine")
            for hit in self._search(data, "vector", "IP", k)[0]
        ]

    def search_lexical(self, query: str, k: int) -> list[SearchHit]:
        if not tokenize(query):
            return []  # nothing BM25 could match (only stop words or punctuation)
        hits = self._search([query], "sparse", "BM25", k)[0]
        # Milvus Lite gives BM25 scores negated (as distances), Milvus positive: a BM25 score is never negative.
        found = [SearchHit(int(hit["id"]), _chunk(hit["entity"]), abs(float(hit["distance"])), "bm25") for hit in hits]
        return [hit for hit in found if hit.score > 0]

    def best_lexical_score(self, query: str) -> float:
        """As `LexicalIndex.best_possible`: each of the question's words searched alone, their best scores summed,
        and a word no chunk holds counted as the rarest word can be (its IDF). Milvus analyses each word again, so
        a long Chinese word that jieba also splits counts its parts too: the scale can only come out a little
        higher than exact, which weighs BM25 a little less, never more."""
        words = list(dict.fromkeys(tokenize(query)))
        if not words:
            return 0.0
        best = [abs(float(hits[0]["distance"])) for hits in self._search(words, "sparse", "BM25", 1) if hits]
        missing = len(words) - len(best)
        rarest = float(np.log(1 + (self.size + 0.5) / 0.5)) if missing else 0.0  # Lucene's IDF of a word in no chunk
        return sum(best) + rarest * missing

    def chunks_of(self, source: str) -> list[StoredChunk]:
        rows = list(self._rows(f"source == {_literal(source)}", _ROW_FIELDS))
        return sorted((_chunk(row) for row in rows), key=lambda chunk: int(chunk.metadata.get("chunk_index", 0)))

    def _search(self, data: list[Any], field: str, metric: str, k: int) -> list[list[dict[str, Any]]]:
        return list(self._milvus.call_loaded(
            "search", self._collection, data=data, anns_field=field, limit=k, output_fields=_ROW_FIELDS,
            search_params={"metric_type": metric},
        ))

    def _rows(self, expression: str, fields: list[str]) -> Iterator[dict[str, Any]]:
        """Every row matching `expression`, page by page (one query returns at most 16384 rows)."""
        pages = self._milvus.call_loaded(
            "query_iterator", self._collection, batch_size=QUERY_BATCH, filter=expression,
            output_fields=["id", *fields],
        )
        try:
            while page := self._milvus.run(lambda _: pages.next()):
                yield from page
        finally:
            self._milvus.run(lambda _: pages.close())


class EmptyView:
    """A collection that does not exist in Milvus yet: no chunks."""

    version = ""
    created_at = ""
    size = 0
    files: Mapping[str, FileEntry] = {}

    def __init__(self, embedding_model: str) -> None:
        self.embedding_model = embedding_model

    def search(self, query_vector: np.ndarray, k: int) -> list[SearchHit]:
        return []

    def search_lexical(self, query: str, k: int) -> list[SearchHit]:
        return []

    def best_lexical_score(self, query: str) -> float:
        return 0.0

    def chunks_of(self, source: str) -> list[StoredChunk]:
        return []


def _chunk(entity: Mapping[str, Any]) -> StoredChunk:
    return StoredChunk(text=str(entity["text"]), metadata=dict(entity["metadata"]))


_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _literal(value: str) -> str:
    """A string literal of Milvus's filter expressions: double quotes, and the escapes its parser knows."""
    return f'"{value.translate(_ESCAPES)}"'


class MilvusCollection(CollectionStore):
    kind: ClassVar[str] = "milvus"

    def __init__(self, embedder: Embedder, name: str, milvus: _Milvus) -> None:
        super().__init__(embedder, name)
        self._milvus = milvus
        self.milvus_name = milvus_collection_name(name)
        self._writing = threading.Lock()

    @property
    def location(self) -> str:
        return f"{shown_uri(self._milvus.uri)} (collection {self.milvus_name})"

    @property
    def store(self) -> StoreView | None:
        """The view served; a collection made meanwhile (maybe by another replica) is served from its first use."""
        if isinstance(self._store, EmptyView):
            try:
                created = self.exists()
            except StoreUnavailableError as error:  # an empty view would hide that Milvus is down
                self._store, self.load_error, self.unavailable = None, error.message, True
                return None
            if created and self.reload() is None:
                self._store = None  # it exists but cannot serve (another embedding model, say): not empty
        elif self._store is None:
            self.reload()
        return self._store

    def absent_view(self) -> EmptyView:
        # Replicas share the store and are filled by ingesting into it, through any of them: one that finds no
        # collection yet serves an empty one (and is ready to take documents) rather than report itself down.
        return EmptyView(self.embedder.name)

    def exists(self) -> bool:
        return bool(self._milvus.call("has_collection", self.milvus_name))

    def read(self, check_embedder: bool = True) -> MilvusView | None:
        if not self.exists():
            return None
        self._milvus.call("load_collection", self.milvus_name)  # searchable (Milvus Lite releases it at a restart)
        description = self._milvus.call("describe_collection", self.milvus_name)
        properties = description.get("properties") or {}
        model = str(properties.get(MODEL_PROPERTY, ""))
        if check_embedder and model != self.embedder.name:
            raise VectorStoreError(
                f"Milvus collection {self.milvus_name} was built with EMBEDDING_MODEL={model or 'unknown'}, not "
                f"{self.embedder.name}: rebuild it with `python scripts/ingest.py --source <folder> --rebuild`"
            )
        return MilvusView(self._milvus, self.milvus_name, model)

    @contextmanager
    def writing(self) -> Iterator[None]:
        # One writer per collection in this process. Replicas writing the same collection at once are not
        # serialised: each change is whole rows, and a document written twice at once lists no content hash
        # (`MilvusView.files`), so its next ingestion replaces every row it has.
        if not self._writing.acquire(blocking=False):
            raise ConflictError("another ingestion is writing this collection; try again when it ends")
        try:
            yield
        finally:
            self._writing.release()

    def apply(
        self, previous: StoreView | None, documents: list[NewDocument], removed: Collection[str], *,
        replace: bool = False,
    ) -> str:
        if replace or not self.exists():
            self._create(documents)
        replaced = set(removed) | {document.source for document in documents}
        old_rows = [i for name, entry in (previous.files if previous else {}).items() if name in replaced
                    for i in entry.chunk_ids]
        rows = [_row(document, chunk, vector) for document in documents
                for chunk, vector in zip(document.chunks, document.vectors, strict=True)]
        for start in range(0, len(rows), INSERT_BATCH):
            batch = rows[start : start + INSERT_BATCH]
            self._milvus.call("insert", self.milvus_name, batch)
        for start in range(0, len(old_rows), QUERY_BATCH):
            ids = old_rows[start : start + QUERY_BATCH]
            self._milvus.call("delete", self.milvus_name, ids=ids)
        return ""

    def _create(self, documents: list[NewDocument]) -> None:
        """(Re)create the collection empty, its vectors as wide as the documents' (or the embedder's). Recreated,
        it is empty until the documents are in: a rebuild's questions meanwhile find nothing."""
        dimension = next((int(d.vectors.shape[1]) for d in documents if len(d.vectors)), None)
        if dimension is None:
            dimension = self.embedder.dimension()
        properties = {NAME_PROPERTY: self.name, MODEL_PROPERTY: self.embedder.name}

        def create(client: Any) -> None:
            milvus = pymilvus()
            DataType, Function, FunctionType = milvus.DataType, milvus.Function, milvus.FunctionType  # noqa: N806

            if client.has_collection(self.milvus_name, timeout=self._milvus.timeout):
                client.drop_collection(self.milvus_name, timeout=self._milvus.timeout)
            schema = client.create_schema(auto_id=True)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True,
                             analyzer_params=ANALYZER)
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
            schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_BYTES)
            schema.add_field("sha256", DataType.VARCHAR, max_length=64)
            schema.add_field("ingested_at", DataType.VARCHAR, max_length=64)
            schema.add_field("document_chunks", DataType.INT64)  # of the whole write: a cut-short one is seen
            schema.add_field("metadata", DataType.JSON)
            schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25,
                                         input_field_names=["text"], output_field_names=["sparse"]))
            index = client.prepare_index_params()
            index.add_index("vector", index_type="FLAT", metric_type="IP")
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            client.create_collection(self.milvus_name, schema=schema, properties=properties,
                                     consistency_level="Strong", timeout=self._milvus.timeout)
            # Waiting for the index asks the server for a timestamp, which Milvus Lite does not implement (it
            # logs a traceback); its indexes are ready at once, and the collection is empty anyway.
            client.create_index(self.milvus_name, index, sync=not self._milvus.is_lite, timeout=self._milvus.timeout)
            client.load_collection(self.milvus_name, timeout=self._milvus.timeout)

        self._milvus.run(create)


def _row(document: NewDocument, chunk: StoredChunk, vector: np.ndarray) -> dict[str, Any]:
    return {
        "text": chunk.text, "vector": np.asarray(vector, dtype=np.float32).tolist(), "source": document.source,
        "sha256": document.sha256, "ingested_at": document.ingested_at, "document_chunks": len(document.chunks),
        "metadata": chunk.metadata,
    }


class MilvusBackend(StoreBackend):
    kind: ClassVar[str] = "milvus"

    def __init__(self, embedder: Embedder, uri: str, token: str, timeout: float) -> None:
        super().__init__(embedder)
        self._milvus = _Milvus(uri, token, timeout)
        self.shared = not self._milvus.is_lite
        self._names: dict[str, str] = {}  # Milvus collection -> lora-rag name: fixed once the collection exists

    @property
    def location(self) -> str:
        return shown_uri(self._milvus.uri)

    def collection(self, name: str) -> MilvusCollection:
        return MilvusCollection(self.embedder, check_collection_name(name), self._milvus)

    def collection_names(self) -> list[str]:
        listed = self._milvus.call("list_collections")
        for milvus_name in listed:
            if milvus_name.startswith(PREFIX) and milvus_name not in self._names:
                description = self._milvus.call("describe_collection", milvus_name)
                name = str((description.get("properties") or {}).get(NAME_PROPERTY, ""))
                if name and milvus_collection_name(name) == milvus_name:
                    self._names[milvus_name] = name
        return sorted(self._names[milvus_name] for milvus_name in listed if milvus_name in self._names)
