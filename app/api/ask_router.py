"""POST /ask: answer a question from the documents."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.api.deps import get_rag_service
from app.api.schemas import AskRequest, AskResponse, ErrorResponse, SourceDocument, Usage
from app.rag.service import RAGService

router = APIRouter(tags=["questions"])

_ERRORS = {
    status: {"model": ErrorResponse} for status in (400, 404, 413, 422, 429, 503, 504)
}


@router.post("/ask", response_model=AskResponse, responses=_ERRORS)  # type: ignore[arg-type]
async def ask(request: AskRequest, service: Annotated[RAGService, Depends(get_rag_service)]) -> AskResponse:
    """Answer `query` from the indexed documents, returning the passages used as `source_documents`.

    `use_lora` picks the backend for this request only (true: the local LoRA model, false: Ollama).
    `model_used` says what answered: `lora`, `base` (no adapter is installed) or `ollama`.
    """
    result = await service.ask(request.query, use_lora=request.use_lora)
    return AskResponse(
        answer=result.answer,
        source_documents=[
            SourceDocument(content=hit.chunk.text, metadata=hit.chunk.metadata, score=hit.score)
            for hit in result.sources
        ],
        model_used=result.model_used,
        processing_time=round(result.processing_time, 4),
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
    )
