"""Vector store administration (admin key required; see app/api/security.py): rebuild from the
documents folder, list the kept versions, roll back to one. The service swaps versions without a restart."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Body, Depends

from app.api.deps import CHANGES_DOCUMENTS, get_store_admin
from app.api.schemas import (
    RebuildRequest,
    RebuildResponse,
    RollbackRequest,
    RollbackResponse,
    StoreVersion,
    StoreVersionsResponse,
    error_responses,
)
from app.rag.store_admin import VectorStoreAdmin

router = APIRouter(prefix="/admin/vector-store", tags=["admin"])
Admin = Annotated[VectorStoreAdmin, Depends(get_store_admin)]

@router.post("/rebuild", response_model=RebuildResponse, responses=error_responses(409, 503, body=True, admin=True),
             dependencies=CHANGES_DOCUMENTS)
async def rebuild(admin: Admin, request: Annotated[RebuildRequest | None, Body()] = None) -> RebuildResponse:
    """Ingest SAMPLE_CORPUS_PATH into a new store version and serve it at once, without a restart.

    Unchanged documents keep their vectors unless `rebuild` is true. While a rebuild, a rollback or
    `scripts/ingest.py` is writing the store, another one gets 409 `conflict`; questions are answered
    from the previous version meanwhile."""
    result = await admin.rebuild(request.rebuild if request else False)
    report = result.report
    return RebuildResponse(
        version=result.serving.version,
        added=len(report.added),
        updated=len(report.updated),
        removed=len(report.removed),
        unchanged=len(report.unchanged),
        failed=report.failed,
        chunks_embedded=report.chunks_embedded,
        chunk_count=report.chunk_count,
        seconds=round(report.seconds, 3),
    )


@router.get("/versions", response_model=StoreVersionsResponse, responses=error_responses(501, admin=True))
async def versions(admin: Admin) -> StoreVersionsResponse:
    """The kept store versions (oldest first), the one CURRENT names and the one answering requests."""
    found = await admin.versions()
    return StoreVersionsResponse(
        current=found.current,
        serving=found.serving,
        versions=[StoreVersion(**asdict(version)) for version in found.versions],
    )


@router.post(
    "/rollback", response_model=RollbackResponse, responses=error_responses(404, 409, 501, 503, body=True, admin=True),
    dependencies=CHANGES_DOCUMENTS,
)
async def rollback(admin: Admin, request: RollbackRequest) -> RollbackResponse:
    """Make a kept version live again. It is verified against its manifest's checksums first: a tampered
    or incomplete version is refused with 409 `invalid_store_version` and the current one keeps serving;
    an unknown version is 404."""
    result = await admin.rollback(request.version)
    return RollbackResponse(version=result.version, previous=result.previous, chunk_count=result.chunk_count)
