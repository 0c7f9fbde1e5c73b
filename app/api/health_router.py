"""GET /health (the guide's report), /health/live and /health/ready (for orchestrators)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app.api.deps import get_rag_service
from app.api.schemas import HealthResponse, LivenessResponse, ReadinessResponse, error_responses
from app.api.visibility import shown_to
from app.rag.service import RAGService

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, responses={**error_responses(), 503: {"model": HealthResponse}})
async def health(request: Request, service: Annotated[RAGService, Depends(get_rag_service)]) -> JSONResponse:
    """Each component's state. `degraded`: the active backend works but another does not;
    `unhealthy` (HTTP 503): the active backend or the vector store cannot serve. Absolute paths in the
    details only for admin keys."""
    report = await service.health()
    body = HealthResponse(
        status=report.status,
        components={name: c.ok for name, c in report.components.items()},
        component_status={name: "healthy" if c.ok else "unhealthy" for name, c in report.components.items()},
        details=shown_to(request, {
            "components": {name: c.detail for name, c in report.components.items()},
            "model_info": service.model_info(),
        }),
    )
    return JSONResponse(status_code=503 if report.status == "unhealthy" else 200, content=body.model_dump())


@router.get("/health/live", response_model=LivenessResponse)
async def live() -> LivenessResponse:
    """The process is up and answering."""
    return LivenessResponse(status="alive")


@router.get("/health/ready", response_model=ReadinessResponse, responses={503: {"model": ReadinessResponse}})
async def ready(service: Annotated[RAGService, Depends(get_rag_service)]) -> JSONResponse:
    """The model, the vector store and the active backend can serve (HTTP 503 otherwise)."""
    report = await service.health()
    body = ReadinessResponse(ready=report.status != "unhealthy", status=report.status)
    return JSONResponse(status_code=200 if body.ready else 503, content=body.model_dump())
