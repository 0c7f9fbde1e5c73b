"""A FAISS vector store with no pickle: vectors in FAISS's own format, text and metadata in JSON.

Layout of VECTOR_STORE_PATH:
    CURRENT              name of the live version folder, replaced atomically
    v000001/ v000002/    index.faiss + docstore.json + lexical.npz + lexical.json (the BM25 index, see
                         `lexical_index`) + manifest.json (sha256 of the other four)
A version folder is complete before CURRENT names it, so a crash at any point leaves the previous
version live; a tampered or half-written version is refused on load. The last KEEP_VERSIONS versions
stay on disk, so CURRENT can be pointed back at one of them (`switch_version`).

The loader trusts no name it reads from disk: CURRENT must hold a version name, the manifest must give
a sha256 for every file the loader opens, and every path resolves, links followed, to an entry directly
in its own folder (CURRENT and the versions in the store folder, their files in the version folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.errors import InvalidStoreVersionError, NotFoundError, VectorStoreError
from app.rag.lexical_index import ARRAYS_FILE, VOCABULARY_FILE, LexicalIndex, LexicalIndexError

logger = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
INDEX_FILE = "index.faiss"
DOCSTORE_FILE = "docstore.json"
MANIFEST_FILE = "manifest.json"
# What the loader opens besides the manifest: each needs a checksum.
VERIFIED_FILES = (INDEX_FILE, DOCSTORE_FILE, ARRAYS_FILE, VOCABULARY_FILE)
VERSION_NAME = re.compile(r"v[0-9]+")  # `_next_version` writes v000001, v000002, ...
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # as hexdigest() writes it
STORE_FORMAT = 2  # 2: with the lexical index
KEEP_VERSIONS = 3
# From this many chunks on, the index scans 8-bit codes and re-ranks the best candidates exactly: a flat scan
# reads all float32 vectors per query (154 MB at 100k x 384-d, 12 ms on one core, memory-bound) where the
# 8-bit codes are 4x fewer bytes (100k: 4-6 ms). Smaller stores stay exact and flat: they are fast already.
APPROXIMATE_MIN_CHUNKS = 20_000
# Candidates re-ranked with the float vectors per result asked for: 16 x top-4 = 64 candidates. The scan
# dominates, so a wide margin costs nothing measurable and keeps the top-k equal to the exact one
# (100% of 300 queries at 100k, random and near-duplicate alike, already with 4).
REFINE_K_FACTOR = 16


@dataclass(frozen=True)
class StoredChunk:
    text: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    chunk_ids: list[int]
    ingested_at: str = ""  # ISO time its content was chunked and embedded; "" in stores written before it was kept


#: what `SearchHit.score` is: cosine similarity (dense), BM25 (lexical), calibrated, relative-score or reciprocal
#: rank fusion (hybrid) or a cross-encoder's relevance (re-ranked); higher is better for each, but kinds do not
#: compare
ScoreKind = Literal["cosine", "bm25", "calibrated", "relative", "rrf", "cross_encoder"]


@dataclass(frozen=True)
class SearchHit:
    chunk_id: int  # in the version searched: hits of two searches of one version are the same chunk by it
    chunk: StoredChunk
    score: float
    score_kind: ScoreKind


@dataclass
class VectorStore:
    """One loaded, immutable version of the store."""

    index: Any  # faiss.Index
    chunks: list[StoredChunk]
    files: dict[str, FileEntry]
    embedding_model: str
    version: str = ""
    created_at: str = field(default="")
    lexical_index: InitVar[LexicalIndex | None] = None  # the one loaded with the version; None: built from chunks
    lexical: LexicalIndex = field(init=False)

    def __post_init__(self, lexical_index: LexicalIndex | None) -> None:
        self.lexical = lexical_index or LexicalIndex.build([chunk.text for chunk in self.chunks])

    @property
    def size(self) -> int:
        return len(self.chunks)

    def search(self, query_vector: np.ndarray, k: int) -> list[SearchHit]:
        if not self.chunks:
            return []
        with _one_omp_thread():
            scores, ids = self.index.search(np.ascontiguousarray(query_vector.reshape(1, -1), dtype=np.float32), k)
        return [
            SearchHit(chunk_id=int(i), chunk=self.chunks[int(i)], score=float(s), score_kind="cosine")
            for s, i in zip(scores[0], ids[0], strict=True)
            if i >= 0
        ]

    def search_lexical(self, query: str, k: int) -> list[SearchHit]:
        """The `k` chunks of the best BM25 score for `query`'s words; only chunks that share a word with it."""
        return [
            SearchHit(chunk_id=i, chunk=self.chunks[i], score=score, score_kind="bm25")
            for i, score in self.lexical.search(query, k)
        ]

    def best_lexical_score(self, query: str) -> float:
        return self.lexical.best_possible(query)

    def chunks_of(self, source: str) -> list[StoredChunk]:
        entry = self.files.get(source)
        return [self.chunks[i] for i in entry.chunk_ids] if entry is not None else []

    def vectors(self, chunk_ids: list[int]) -> np.ndarray:
        """Stored vectors of these chunks, so unchanged files are not embedded again."""
        if not chunk_ids:
            return np.zeros((0, self.index.d), dtype=np.float32)
        return np.stack([self.index.reconstruct(int(i)) for i in chunk_ids])


@contextmanager
def _one_omp_thread() -> Iterator[None]:
    """Run a search on one OpenMP thread, then give the calling thread its previous count back.

    A single query is 2-3x slower on two threads (they spin-wait for each other: 100k flat, 12 ms -> 40 ms).
    The count is per calling thread in OpenMP, and torch in the same thread reads it too, so setting it once
    for the process (as the loader used to) made every later embedding in that thread single-threaded."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def build_index(vectors: np.ndarray, dimension: int) -> Any:
    """Exact inner product below APPROXIMATE_MIN_CHUNKS; above, an 8-bit scan re-ranked with the float vectors.

    Both keep the float vectors (`reconstruct` gives them back exactly, for incremental ingestion) and both
    return exact inner products as scores; faiss writes and reads either in its own format."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < APPROXIMATE_MIN_CHUNKS:
        flat = faiss.IndexFlatIP(dimension)
        if len(vectors):
            flat.add(vectors)
        return flat
    codes = faiss.IndexScalarQuantizer(dimension, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefineFlat(codes)
    index.k_factor = REFINE_K_FACTOR
    index.train(vectors)  # the per-dimension ranges of the 8-bit codes
    index.add(vectors)
    return index


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as stream:
        os.fsync(stream.fileno())


def current_version(store_path: Path) -> str | None:
    """The version CURRENT names; None without one, and also when CURRENT is unusable (`load_store` says why)."""
    try:
        return _read_current(store_path)
    except VectorStoreError:
        return None


def _read_current(store_path: Path) -> str | None:
    """The version name in CURRENT, None when there is none; VectorStoreError when CURRENT is a link out of
    the store or holds anything but a version name (its content stays out of the message: it may be anything)."""
    pointer = store_path / CURRENT_FILE
    if not os.path.lexists(pointer):
        return None
    path = _entry_in(store_path.resolve(), CURRENT_FILE)
    if path is None or not path.is_file():
        raise VectorStoreError(f"{CURRENT_FILE} is not a file in the vector store folder (a link out of it?)")
    with path.open("rb") as stream:
        name = stream.read(64).decode("ascii", errors="replace").strip()  # a version name is a dozen bytes
    if not name:
        return None
    if not VERSION_NAME.fullmatch(name):
        raise VectorStoreError(f"{CURRENT_FILE} does not hold a version name (v followed by digits)")
    return name


def _entry_in(folder: Path, name: str) -> Path | None:
    """`folder / name` with links resolved, when `name` is one plain name (no separator, not `..`) and the
    resolved path is still directly in `folder` (itself resolved); None otherwise."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return None
    try:
        path = (folder / name).resolve()
    except (OSError, RuntimeError):  # a link loop
        return None
    return path if path.parent == folder else None


def _shown(name: str) -> str:
    """A name read from disk, quoted and cut short for a message."""
    return repr(name if len(name) <= 80 else name[:77] + "...")


def store_exists(store_path: Path) -> bool:
    return current_version(store_path) is not None


def load_store(store_path: Path, expected_embedding_model: str | None = None) -> VectorStore:
    """Load and verify the live version; raise VectorStoreError saying what is wrong."""
    version = _read_current(store_path)
    if version is None:
        raise VectorStoreError(
            f"no vector store at {store_path.name}/: build it with `python scripts/ingest.py --source <folder>`"
        )
    return load_version(store_path, version, expected_embedding_model)


def load_version(store_path: Path, version: str, expected_embedding_model: str | None = None) -> VectorStore:
    """Load and verify one version folder, live or not; raise VectorStoreError saying what is wrong."""
    import faiss

    try:
        manifest, listed = _read_manifest(_version_folder(store_path, version), version)
        for name, entry in listed.items():
            if _sha256(entry.path) != entry.sha256:
                raise VectorStoreError(
                    f"vector store {version}: {_shown(name)} does not match its checksum (tampered?)"
                )
        payload = json.loads(listed[DOCSTORE_FILE].path.read_text(encoding="utf-8"))
        index = faiss.read_index(str(listed[INDEX_FILE].path))
        lexical = LexicalIndex.read(listed[ARRAYS_FILE].path, listed[VOCABULARY_FILE].path)
        chunks = [StoredChunk(text=str(c["text"]), metadata=dict(c["metadata"])) for c in payload["chunks"]]
        files = {
            name: FileEntry(str(e["sha256"]), [int(i) for i in e["chunk_ids"]], str(e.get("ingested_at", "")))
            for name, e in payload["files"].items()
        }
        model = str(manifest["embedding_model"])
        consistent = index.ntotal == len(chunks) == lexical.size
    except VectorStoreError:
        raise
    except LexicalIndexError as error:
        raise VectorStoreError(f"vector store {version}: its lexical index is unusable: {error}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as error:
        raise VectorStoreError(f"vector store {version} is unreadable ({type(error).__name__})") from None
    if not consistent:
        raise VectorStoreError(
            f"vector store {version} is inconsistent: {index.ntotal} vectors, {len(chunks)} chunks, "
            f"{lexical.size} in the lexical index"
        )
    if expected_embedding_model is not None and model != expected_embedding_model:
        raise VectorStoreError(
            f"the vector store was built with EMBEDDING_MODEL={model}, not {expected_embedding_model}: "
            "rebuild it with `python scripts/ingest.py --source <folder> --rebuild`"
        )
    created_at = str(manifest.get("created_at", ""))
    return VectorStore(index, chunks, files, model, version=version, created_at=created_at, lexical_index=lexical)


@dataclass(frozen=True)
class _ListedFile:
    path: Path  # resolved, directly in the version folder
    sha256: str


def _version_folder(store_path: Path, version: str) -> Path:
    """The folder of `version`, resolved; VectorStoreError unless it is a version name whose folder resolves
    to a folder directly in the store folder (through a link it would serve a folder the store does not own)."""
    if not VERSION_NAME.fullmatch(version):
        raise VectorStoreError("not a vector store version name (v followed by digits)")
    folder = _entry_in(store_path.resolve(), version)
    if folder is None or not folder.is_dir():
        raise VectorStoreError(f"vector store {version}: its folder is missing from the store or a link out of it")
    return folder


def _read_manifest(folder: Path, version: str) -> tuple[dict[str, Any], dict[str, _ListedFile]]:
    """The manifest of a version and the files it lists, each checked to be a file of the version folder with
    a well-formed sha256, and VERIFIED_FILES all among them; nothing is hashed here."""
    manifest_path = _entry_in(folder, MANIFEST_FILE)
    if manifest_path is None or not manifest_path.is_file():
        raise VectorStoreError(f"vector store {version}: {MANIFEST_FILE} is not a file in the version folder")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != STORE_FORMAT:
        raise VectorStoreError(
            f"vector store {version} has format {manifest.get('format')!r}, this server reads {STORE_FORMAT} "
            "(format 2 added the lexical index): rebuild it with `python scripts/ingest.py --source <folder> --rebuild`"
        )
    checksums = manifest["checksums"]
    if not isinstance(checksums, dict):
        raise VectorStoreError(f"vector store {version}: the checksums in {MANIFEST_FILE} are not a mapping")
    listed = {}
    for name, checksum in checksums.items():
        path = _entry_in(folder, name)
        if path is None or not path.is_file():
            raise VectorStoreError(
                f"vector store {version}: {MANIFEST_FILE} lists {_shown(name)}, which is not a file in the version "
                "folder (a path, or a link out of it)"
            )
        if checksum == "":
            raise VectorStoreError(
                f"vector store {version}: the checksum of {_shown(name)} in {MANIFEST_FILE} is empty"
            )
        if not isinstance(checksum, str) or not SHA256_HEX.fullmatch(checksum):
            raise VectorStoreError(
                f"vector store {version}: the checksum of {_shown(name)} in {MANIFEST_FILE} is not a sha256 "
                "(64 lowercase hex digits)"
            )
        listed[name] = _ListedFile(path, checksum)
    for name in VERIFIED_FILES:
        if name not in listed:
            raise VectorStoreError(f"vector store {version}: {MANIFEST_FILE} has no checksum for {name}")
    return manifest, listed


def write_store(store_path: Path, store: VectorStore) -> str:
    """Write a new version folder, then point CURRENT at it atomically; return the version name."""
    store_path.mkdir(parents=True, exist_ok=True)
    version = _next_version(store_path)
    staging = _staged_version(store_path, store, version, datetime.now(UTC).isoformat(timespec="seconds"))
    try:
        staging.rename(store_path / version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _point_current(store_path, version)
    _prune_old_versions(store_path, keep=KEEP_VERSIONS)
    return version


def rewrite_version(store_path: Path, store: VectorStore) -> None:
    """Replace the folder of kept version `store.version` (never the live one) by `store`, written whole under the
    same name and creation time: a purge takes a deleted document out of the versions kept for rollback."""
    if store.version == current_version(store_path):
        raise VectorStoreError(f"vector store {store.version} is live: it is changed by a new version, not rewritten")
    old = _version_folder(store_path, store.version)
    staging = _staged_version(store_path, store, store.version, store.created_at)
    discarded = store_path / f".writing-discarded-{store.version}"  # removed with the other leftovers if we stop
    try:
        old.rename(discarded)
        staging.rename(store_path / store.version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(store_path)
    shutil.rmtree(discarded, ignore_errors=True)


def _staged_version(store_path: Path, store: VectorStore, version: str, created_at: str) -> Path:
    """`store` written whole and synced into a new hidden folder of `store_path`, ready to be renamed `version`."""
    import faiss

    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=store_path))
    try:
        faiss.write_index(store.index, str(staging / INDEX_FILE))
        _fsync_file(staging / INDEX_FILE)  # faiss does not sync; the folder must be whole before it is named
        payload = {
            "chunks": [{"text": c.text, "metadata": c.metadata} for c in store.chunks],
            "files": {
                name: {"sha256": e.sha256, "chunk_ids": e.chunk_ids, "ingested_at": e.ingested_at}
                for name, e in store.files.items()
            },
        }
        _fsync_write(staging / DOCSTORE_FILE, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
        _fsync_write(staging / ARRAYS_FILE, store.lexical.arrays_bytes())
        _fsync_write(staging / VOCABULARY_FILE, store.lexical.vocabulary_bytes())
        manifest = {
            "format": STORE_FORMAT,
            "version": version,
            "created_at": created_at,
            "embedding_model": store.embedding_model,
            "dimension": int(store.index.d),
            "chunk_count": len(store.chunks),
            "checksums": {name: _sha256(staging / name) for name in VERIFIED_FILES},
        }
        _fsync_write(staging / MANIFEST_FILE, json.dumps(manifest, indent=2).encode("utf-8"))
        staging.chmod(0o755)
        _fsync_directory(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def kept_versions(store_path: Path) -> list[str]:
    """The names of the kept version folders, oldest first."""
    return [folder.name for folder in _version_folders(store_path)]


@dataclass(frozen=True)
class VersionInfo:
    """A kept version as its manifest describes it; `problem` says why the manifest cannot be read."""

    version: str
    live: bool
    created_at: str = ""
    chunk_count: int | None = None
    embedding_model: str = ""
    problem: str | None = None


def list_versions(store_path: Path) -> list[VersionInfo]:
    """The kept version folders, oldest first. Their manifests only, checked as on loading (folders, file names,
    checksums well-formed) but nothing hashed: checksums are verified on switching."""
    live = current_version(store_path)
    versions = []
    for folder in _version_folders(store_path):
        try:
            manifest, _ = _read_manifest(_version_folder(store_path, folder.name), folder.name)
            versions.append(
                VersionInfo(
                    folder.name,
                    folder.name == live,
                    created_at=str(manifest.get("created_at", "")),
                    chunk_count=int(manifest["chunk_count"]),
                    embedding_model=str(manifest["embedding_model"]),
                )
            )
        except VectorStoreError as error:
            versions.append(VersionInfo(folder.name, folder.name == live, problem=error.message))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            problem = f"unreadable manifest ({type(error).__name__})"
            versions.append(VersionInfo(folder.name, folder.name == live, problem=problem))
    return versions


def switch_version(store_path: Path, version: str, expected_embedding_model: str | None = None) -> VectorStore:
    """Make a kept version live again: verify it whole, then point CURRENT at it atomically.

    The caller holds the ingestion lock, so no ingestion switches or prunes versions meanwhile."""
    kept = kept_versions(store_path)
    if version not in kept:  # a name, never joined onto the path unchecked
        raise NotFoundError(f"no vector store version {version!r}; kept versions: {', '.join(kept) or 'none'}")
    try:
        store = load_version(store_path, version, expected_embedding_model)
    except VectorStoreError as error:
        raise InvalidStoreVersionError(f"version {version} cannot be made live: {error.message}") from None
    _point_current(store_path, version)
    return store


def _point_current(store_path: Path, version: str) -> None:
    """Name `version` in CURRENT: readers see the old name or the new one, never a partial file."""
    pointer = store_path / f".{CURRENT_FILE}.tmp"
    _fsync_write(pointer, (version + "\n").encode("utf-8"))
    os.replace(pointer, store_path / CURRENT_FILE)
    _fsync_directory(store_path)


def _version_folders(store_path: Path) -> list[Path]:
    folders = [p for p in store_path.glob("v[0-9]*") if p.is_dir() and VERSION_NAME.fullmatch(p.name)]
    return sorted(folders, key=lambda folder: int(folder.name[1:]))


def _next_version(store_path: Path) -> str:
    numbers = [int(p.name[1:]) for p in store_path.glob("v[0-9]*") if VERSION_NAME.fullmatch(p.name)]
    return f"v{max(numbers, default=0) + 1:06d}"


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _prune_old_versions(store_path: Path, keep: int) -> None:
    live = current_version(store_path)
    for old in _version_folders(store_path)[:-keep]:
        if old.name != live:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in store_path.glob(".writing-*"):
        shutil.rmtree(leftover, ignore_errors=True)
