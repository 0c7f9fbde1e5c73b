"""POST /switch_model (admin key) and GET /model_info."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from app.api.deps import CHANGES_WHAT_IS_SERVED, get_rag_service
from app.api.schemas import ModelInfo, SwitchModelRequest, SwitchModelResponse, error_responses
from app.api.visibility import shown_to
from app.rag.service import RAGService

router = APIRouter(tags=["models"])


@router.post(
    "/switch_model",
    response_model=SwitchModelResponse,
    responses=error_responses(404, 409, 503, body=True, admin=True),
    dependencies=CHANGES_WHAT_IS_SERVED,
)
async def switch_model(
    request: SwitchModelRequest, service: Annotated[RAGService, Depends(get_rag_service)]
) -> SwitchModelResponse:
    """Make a backend the default for every caller's later requests (admin key), by name (`{"backend":
    "remote"}`: lora, ollama or remote, those this server has) or the older way (`use_lora: true` for lora,
    `false` for ollama). An unknown backend is 404; one that cannot serve now is refused with 503 and the
    active one stays.

    Or switch the LoRA model, as the design card's FAQ does: `{"adapter": "<name>"}` makes a loaded adapter the
    default on the lora backend (unknown: 404), `{"lora_model_path": "<folder>"}` loads that folder first (named
    after it; the admin load's path rules: a bad path is 400); either makes lora the active backend. Nothing
    changes when any step fails.

    Requests already generating finish on the backend and adapter they started with.
    """
    if request.adapter is not None or request.lora_model_path is not None:
        default = await service.models.switch_adapter(request.adapter, request.lora_model_path)
        return SwitchModelResponse(
            using_lora=True, active_backend="lora", default_adapter=default,
            message=f"later requests use the lora backend with adapter {default!r} unless they name another",
        )
    name = request.backend_name()
    assert name is not None  # the request model requires one way or another
    active = await service.models.switch(name)
    return SwitchModelResponse(
        using_lora=active == "lora", active_backend=active, default_adapter=service.models.default_adapter(),
        message=f"later requests use the {active} backend",
    )


@router.get("/model_info", response_model=ModelInfo, responses=error_responses())
async def model_info(request: Request, service: Annotated[RAGService, Depends(get_rag_service)]) -> ModelInfo:
    """The base model, the adapter, the active backend and where models and the vector store live
    (absolute paths only for admin keys)."""
    return ModelInfo(**shown_to(request, service.model_info()))
