"""POST /ask: answer a question from the documents."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from app.api.deps import get_rag_service
from app.api.disconnect import Watch
from app.api.schemas import AskRequest, AskResponse, CitationOut, SourceDocument, Usage, error_responses
from app.api.streaming import PieceStream, start_streaming
from app.errors import AppError
from app.rag.service import AskResult, RAGService

router = APIRouter(tags=["questions"])

_ERRORS = error_responses(404, 503, 504, body=True)


@router.post(
    "/ask",
    response_model=AskResponse,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},  # type: ignore[dict-item]
)
async def ask(
    request: AskRequest, service: Annotated[RAGService, Depends(get_rag_service)], watch: Watch
) -> AskResponse | StreamingResponse:
    """Answer `query` from the indexed documents, returning the passages used as `source_documents`.

    `backend` picks the backend for this request only, by name (lora, ollama, remote); `use_lora` is the older
    way (true: lora, false: ollama). Unknown: 404.
    `adapter` / `adapter_id` / `lora_adapter_ids` / `adapters` pick LoRA adapters for this request
    (null or `"__base__"`: the base model alone). `model_used` says what answered: `lora`, `base`, `ollama` or `remote`.
    `collection` names the document set to answer from (default `default`; unknown: 404 listing the known ones).
    `response_format` (OpenAI's shape) makes the answer JSON: any object, or valid for a JSON Schema; a schema that
    cannot be used is a 400 naming the problem, before anything is generated. `citations: true` returns the
    passages' sentences the answer used (`citations`: source_index, quote), each quoted word for word.
    With `stream: true` the answer arrives as Server-Sent Events: `delta` events with pieces of text,
    then one `done` event carrying the full response (or an `error` event).
    """
    spec = request.adapter_spec()
    backend = request.backend_name()
    constraint = request.constraint()
    if not request.stream:
        return _response(await watch.run(service.ask(request.query, backend, spec, None, request.collection,
                                                     constraint, request.citations)))
    stream = await start_streaming(watch, lambda on_text: service.ask(
        request.query, backend, spec, on_text, request.collection, constraint, request.citations))
    return StreamingResponse(_events(stream), media_type="text/event-stream")


async def _events(stream: PieceStream[AskResult]) -> AsyncIterator[str]:
    async for piece in stream.pieces():
        yield _event("delta", {"delta": piece})
    try:
        yield _event("done", _response(stream.result).model_dump())
    except AppError as error:
        yield _event("error", {"error": error.code, "message": error.message})


def _event(name: str, data: object) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _response(result: AskResult) -> AskResponse:
    return AskResponse(
        answer=result.answer,
        source_documents=[SourceDocument.from_hit(hit) for hit in result.sources],
        model_used=result.model_used,
        adapters=result.adapters,
        processing_time=round(result.processing_time, 4),
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        finish_reason=result.finish_reason,
        notice=result.notice,
        citations=None if result.citations is None else [
            CitationOut(source_index=citation.source_index, quote=citation.quote) for citation in result.citations],
    )
