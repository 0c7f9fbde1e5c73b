"""Schemathesis fuzzes the whole OpenAPI surface of a running app (Ollama wire backend, admin key):
no 5xx, and every answer has a declared status, content type and body schema."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case

from app.main import create_app
from tests.conftest import CORPUS, make_settings, running_server
from tests.ollama_wire_server import OllamaWireServer

ADMIN_KEY = "admin-key-fuzz"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}

pytestmark = pytest.mark.slow  # about 40 s: a few hundred requests, and the local model loads for chat

# The OpenAPI document does not depend on settings or on the lifespan, so it is read from an app that never
# starts; the requests go to the running app below. (schemathesis.pytest.from_fixture needs pytest < 9.)
schema = schemathesis.openapi.from_dict(create_app(make_settings(Path("unused"))).openapi())


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, corpus_store: Path) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    store = folder / "store"
    shutil.copytree(corpus_store, store)  # the admin rebuild and rollback routes write to it
    with OllamaWireServer(models=["qwen3:4b"]) as ollama:
        app_settings = make_settings(
            folder, vector_store_path=store, sample_corpus_path=CORPUS, chunk_size=300, chunk_overlap=50,
            use_lora_default=False, ollama_base_url=ollama.base_url, admin_api_keys=ADMIN_KEY,
            rate_limit_per_minute=0, max_new_tokens=2,  # local generations stay quick
        )
        with running_server(create_app(app_settings)) as base_url:
            yield base_url


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: Case, url: str) -> None:
    # Schema-valid requests may still be refused by rules a schema cannot state (one adapter field at a time,
    # n=1, an adapter path inside the allowed folders): refusing them is right, and the other checks still
    # hold the refusal to a declared status and an `ErrorResponse` body.
    case.call_and_validate(
        base_url=url, headers=HEADERS, timeout=120, excluded_checks=[schemathesis.checks.positive_data_acceptance]
    )
