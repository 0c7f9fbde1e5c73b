"""The vector store trusts none of its own files: every file the loader opens needs a well-formed checksum in
the manifest, and every name read from disk (CURRENT, the manifest's entries, links) stays in the store.

Each test spoils a copy of a real ingested store and checks that rollback refuses it (409), that CURRENT and
the live version stay, and that loading it at start fails with VectorStoreError, as for any tampered version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.errors import InvalidStoreVersionError, VectorStoreError
from app.rag.embeddings import Embedder
from app.rag.vector_store import (
    CURRENT_FILE,
    DOCSTORE_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    current_version,
    list_versions,
    load_store,
    load_version,
    switch_version,
)
from tests.conftest import faiss_store
from tests.test_store_admin import ADMIN, app_url, documents  # noqa: F401  (fixtures: the app on a real server)

SECRET = "outside-the-store-4711"  # content of a file outside the store, which must never be read
SECRET_SHA256 = hashlib.sha256(SECRET.encode()).hexdigest()


@pytest.fixture()
def store(tmp_path: Path, corpus_store: Path) -> Path:
    """A copy of the ingested corpus with two whole versions: v000002 live, v000001 the rollback target to spoil."""
    path = tmp_path / "store"
    shutil.copytree(corpus_store, path)
    shutil.copytree(path / "v000001", path / "v000002")
    (path / CURRENT_FILE).write_text("v000002\n", encoding="utf-8")
    return path


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    """A file next to the store with known content, last read days ago (so reading it now moves its atime)."""
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text(SECRET, encoding="utf-8")
    long_ago = time.time() - 3 * 86400
    os.utime(path, (long_ago, long_ago))
    return path


@pytest.fixture()
def elsewhere(tmp_path: Path, corpus_store: Path) -> Path:
    """A whole, valid version folder outside the store (as a backup copy would be)."""
    path = tmp_path / "elsewhere" / "v000002"
    shutil.copytree(corpus_store / "v000001", path)
    return path


def _edit_manifest(version: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest_path = version / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    change(manifest)
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")


def _assert_refused(store: Path, version: str, *fragments: str) -> str:
    """`version` is refused everywhere with a message holding `fragments`; v000002 stays live. Returns the message."""
    with pytest.raises(InvalidStoreVersionError) as rollback:
        switch_version(store, version)
    assert current_version(store) == "v000002" and load_store(store).version == "v000002"
    with pytest.raises(VectorStoreError) as loading:
        load_version(store, version)
    listed = {info.version: info.problem for info in list_versions(store)}
    message = loading.value.message
    for fragment in fragments:
        assert fragment in rollback.value.message and fragment in message, (fragment, message)
    assert listed["v000002"] is None and listed[version] is not None
    (store / CURRENT_FILE).write_text(version + "\n", encoding="utf-8")  # as if it were live at start
    with pytest.raises(VectorStoreError, match=version):
        load_store(store)
    return message


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda checksums: checksums.pop(DOCSTORE_FILE), ("no checksum for docstore.json",)),
        (lambda checksums: checksums.clear(), ("no checksum for index.faiss",)),
        (lambda checksums: checksums.update({DOCSTORE_FILE: ""}), ("'docstore.json'", "is empty")),
        (lambda checksums: checksums.update({INDEX_FILE: ""}), ("'index.faiss'", "is empty")),
        (lambda checksums: checksums.update({DOCSTORE_FILE: "abc123"}), ("'docstore.json'", "not a sha256")),
        (lambda checksums: checksums.update({DOCSTORE_FILE: "z" * 64}), ("'docstore.json'", "not a sha256")),
        (lambda checksums: checksums.update({INDEX_FILE: None}), ("'index.faiss'", "not a sha256")),
    ],
    ids=["missing", "none-at-all", "empty-docstore", "empty-index", "short", "not-hex", "null"],
)
def test_every_file_the_loader_opens_needs_a_well_formed_checksum(
    store: Path, change: Callable[[dict[str, Any]], None], fragments: tuple[str, ...]
) -> None:
    version = store / "v000001"
    docstore = version / DOCSTORE_FILE  # changed too: a missing or unusable checksum must not let that through
    docstore.write_text(docstore.read_text(encoding="utf-8").replace("eighteen", "eighty"), encoding="utf-8")
    _edit_manifest(version, lambda manifest: change(manifest["checksums"]))
    _assert_refused(store, "v000001", "v000001", *fragments)


@pytest.mark.parametrize(
    "entry",
    [
        lambda secret, version: os.path.relpath(secret, version),  # ../../outside/secret.txt
        lambda secret, version: "../../../../etc/hostname",
        lambda secret, version: str(secret),
        lambda secret, version: f"../v000001/{DOCSTORE_FILE}",  # a path even when it lands back inside
    ],
    ids=["relative-to-a-file-outside", "etc-hostname", "absolute", "path-into-the-folder"],
)
def test_a_manifest_entry_that_is_a_path_is_refused_and_not_read(
    store: Path, outside: Path, entry: Callable[[Path, Path], str]
) -> None:
    version = store / "v000001"
    name = entry(outside, version)
    read_at = outside.stat().st_atime
    # With its true checksum: a loader that followed the name would hash the file, find it matches and go on.
    _edit_manifest(version, lambda manifest: manifest["checksums"].update({name: SECRET_SHA256}))

    quoted = f"lists {name!r}"[:50]  # a long name is cut short in the message
    message = _assert_refused(store, "v000001", quoted, "not a file in the version folder")
    assert SECRET not in message
    assert outside.stat().st_atime == read_at  # relatime moves an atime older than a day on any read


@pytest.mark.parametrize(
    "content",
    [
        lambda elsewhere: b"../elsewhere/v000002\n",
        lambda elsewhere: str(elsewhere).encode() + b"\n",
        lambda elsewhere: b"v000002/../../elsewhere/v000002",
        lambda elsewhere: b"\xff\xfe garbage \x00 v000002",
        lambda elsewhere: b"v000002 v000001",
    ],
    ids=["relative-outside", "absolute", "through-a-version", "binary-garbage", "two-names"],
)
def test_current_naming_anything_but_a_version_of_the_store_is_refused_and_the_last_good_one_served(
    store: Path, elsewhere: Path, embedder: Embedder, content: Callable[[Path], bytes]
) -> None:
    retriever = faiss_store(embedder, store)
    assert retriever.reload() is not None
    (store / CURRENT_FILE).write_bytes(content(elsewhere))

    with pytest.raises(VectorStoreError) as loading:
        load_store(store)
    assert loading.value.message == "CURRENT does not hold a version name (v followed by digits)"
    assert current_version(store) is None  # never a path for the caller to join
    assert retriever.reload() is None and retriever.load_error == loading.value.message
    assert retriever.store is not None and retriever.store.version == "v000002"  # still serving


def test_current_that_is_a_link_out_of_the_store_is_refused(store: Path, tmp_path: Path) -> None:
    pointer = tmp_path / "elsewhere-CURRENT"
    pointer.write_text("v000002\n", encoding="utf-8")
    (store / CURRENT_FILE).unlink()
    (store / CURRENT_FILE).symlink_to(pointer)

    with pytest.raises(VectorStoreError, match="CURRENT is not a file in the vector store folder"):
        load_store(store)
    assert current_version(store) is None


def test_a_version_folder_that_is_a_link_out_of_the_store_is_refused(store: Path, elsewhere: Path) -> None:
    (store / "v000003").symlink_to(elsewhere, target_is_directory=True)

    _assert_refused(store, "v000003", "v000003", "its folder is missing from the store or a link out of it")
    assert elsewhere.is_dir() and (elsewhere / MANIFEST_FILE).is_file()  # nothing pruned through the link


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        (INDEX_FILE, "lists 'index.faiss', which is not a file in the version folder"),
        (DOCSTORE_FILE, "lists 'docstore.json', which is not a file in the version folder"),
        (MANIFEST_FILE, "manifest.json is not a file in the version folder"),
    ],
)
def test_a_file_of_the_version_that_is_a_link_out_of_its_folder_is_refused(
    store: Path, tmp_path: Path, name: str, fragment: str
) -> None:
    # The same bytes, moved out and linked back: the checksums still match, only the place is wrong.
    moved = tmp_path / "outside" / name
    moved.parent.mkdir()
    shutil.move(store / "v000001" / name, moved)
    (store / "v000001" / name).symlink_to(moved)

    _assert_refused(store, "v000001", "v000001", fragment)


def test_the_rollback_route_answers_409_for_a_manifest_reaching_out_of_the_store(
    app_url: str, tmp_path: Path, outside: Path  # noqa: F811  (the fixture imported above)
) -> None:
    store = tmp_path / "store"  # the app's store: v000001 live
    shutil.copytree(store / "v000001", store / "v000002")
    name = os.path.relpath(outside, store / "v000002")
    _edit_manifest(store / "v000002", lambda manifest: manifest["checksums"].update({name: SECRET_SHA256}))

    with httpx.Client(base_url=app_url, timeout=120, headers=ADMIN) as client:
        refused = client.post("/admin/vector-store/rollback", json={"version": "v000002"})
        versions = client.get("/admin/vector-store/versions").json()

    assert refused.status_code == 409 and refused.json()["error"] == "invalid_store_version"
    assert f"lists {name!r}" in refused.json()["message"] and SECRET not in refused.text
    assert versions["current"] == versions["serving"] == "v000001"
    problems = {version["version"]: version["problem"] for version in versions["versions"]}
    assert problems["v000001"] is None and "not a file in the version folder" in problems["v000002"]
