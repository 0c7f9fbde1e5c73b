"""Adapter management at run time (admin key required; see app/api/security.py).

`/admin/*` answers JSON; `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` mirror vLLM's routes,
bodies and status codes (400 invalid or duplicate, 404 unknown) so vLLM tooling works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from app.api.deps import CHANGES_WHAT_IS_SERVED, get_rag_service
from app.api.errors import OPENAI
from app.api.metrics import AdapterChange, adapter_change_counter
from app.api.schemas import (
    LoadAdapterRequest,
    UnloadAdapterRequest,
    VllmLoadAdapterRequest,
    VllmUnloadAdapterRequest,
    error_responses,
)
from app.rag.service import RAGService

router = APIRouter(tags=["admin"])
_ERRORS = error_responses(404, 409, 503, body=True, admin=True)
# vLLM answers success as plain text and errors as JSON (OpenAI's envelope, as every /v1 route). A `model` entry
# would be documented in the route's text/plain, so the vLLM routes declare their error bodies with the JSON media
# type themselves, by reference: /v1/chat/completions puts the envelope's schema among the components.
_VLLM_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{OPENAI.model.__name__}"}}}}
    for status in error_responses(404, 409, 503, body=True, admin=True, envelope=OPENAI)
}
Service = Annotated[RAGService, Depends(get_rag_service)]
CountChange = Annotated[Callable[[AdapterChange], None], Depends(adapter_change_counter)]


@router.post("/admin/load-lora-adapter", responses=_ERRORS, dependencies=CHANGES_WHAT_IS_SERVED)
async def load_adapter(request: LoadAdapterRequest, service: Service, count: CountChange) -> dict[str, Any]:
    """Attach the adapter at `lora_path` (a name or path inside the allowed adapter folders) as `lora_name`.
    Loading the same name from the same path again is harmless."""
    entry = await service.models.load_adapter(request.lora_name, request.lora_path)
    count("load")
    return entry


@router.post("/admin/unload-lora-adapter", responses=_ERRORS, dependencies=CHANGES_WHAT_IS_SERVED)
async def unload_adapter(request: UnloadAdapterRequest, service: Service, count: CountChange) -> dict[str, str]:
    """Detach an adapter; requests already generating with it finish, later ones get 404."""
    await service.models.unload_adapter(request.lora_name)
    count("unload")
    return {"unloaded": request.lora_name}


@router.get("/admin/adapters", responses=_ERRORS)
async def list_adapters(service: Service) -> dict[str, Any]:
    """Every known adapter (path, status, rank, alpha, target modules, size, load time, requests served)
    and the weighted mixes built so far."""
    return await service.models.adapter_catalogue()


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=_VLLM_ERRORS,
             dependencies=CHANGES_WHAT_IS_SERVED)
async def vllm_load_adapter(request: VllmLoadAdapterRequest, service: Service, count: CountChange) -> str:
    """vLLM-compatible load."""
    await service.models.load_adapter(request.lora_name, request.lora_path)
    count("load")
    return f"Success: LoRA adapter '{request.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=_VLLM_ERRORS,
             dependencies=CHANGES_WHAT_IS_SERVED)
async def vllm_unload_adapter(request: VllmUnloadAdapterRequest, service: Service, count: CountChange) -> str:
    """vLLM-compatible unload."""
    await service.models.unload_adapter(request.lora_name)
    count("unload")
    return f"Success: LoRA adapter '{request.lora_name}' removed successfully."
