"""The OpenAI-compatible API: POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models (and /models).

The official `openai` client and LangChain's `ChatOpenAI` work against it with `base_url=<server>/v1`.
`model` picks the base model or one adapter; `rag: true` answers from the indexed documents. Embeddings come
from the embedder the documents are searched with.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.api.deps import get_rag_service
from app.api.disconnect import Watch
from app.api.errors import OPENAI, describe_error
from app.api.openai_schemas import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceDelta,
    ChoiceDeltaFunctionCall,
    ChoiceDeltaToolCall,
    ChoiceLogprobs,
    CompletionUsage,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    EncodingFormat,
    ModelCard,
    ModelList,
    ModelNotFoundError,
    OpenAIFinishReason,
)
from app.api.schemas import SourceDocument, error_responses
from app.api.streaming import PieceStream, start_streaming
from app.llm.base import FinishReason, GenerationResult, TextCallback
from app.rag.service import ChatResult, RAGService
from app.rag.vector_store import SearchHit

router = APIRouter(tags=["openai"])
Service = Annotated[RAGService, Depends(get_rag_service)]
#: "cancelled" means the caller went away; OpenAI's types have no such reason and nobody reads it anyway.
#: "repetition" (the engine stopped a loop) is "stop" to OpenAI's clients, with `notice` saying why.
_FINISH_REASONS: dict[FinishReason, OpenAIFinishReason] = {
    "stop": "stop", "length": "length", "cancelled": "stop", "repetition": "stop", "tool_calls": "tool_calls",
}
_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class _Completion:
    """What every chunk of one completion repeats."""

    id: str
    created: int
    model: str


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        **error_responses(404, 503, 504, body=True, envelope=OPENAI),
        200: {"content": {"text/event-stream": {}}},
    },
)
async def chat_completions(
    request: ChatCompletionRequest, service: Service, watch: Watch
) -> ChatCompletionResponse | StreamingResponse:
    """Create a chat completion, as OpenAI's API does, on the local model.

    `model` is the base model's name (the base model alone) or an adapter's name; `GET /v1/models` lists
    both. `adapter` / `adapter_id` / `lora_adapter_ids` / `adapters` choose adapters instead of `model`.
    With `rag: true` the answer is given from the indexed documents and the passages used come back as
    `sources` (in the last chunk when streaming). `stream: true` sends `chat.completion.chunk` Server-Sent
    Events ending with `data: [DONE]`; `stream_options.include_usage` adds a chunk with the token counts.
    `tools` with `tool_choice` (`auto`, `required`, a named function, `none`) give `message.tool_calls` and
    `finish_reason: "tool_calls"`; a forced call's arguments are valid for its tool's schema. `response_format`
    holds the answer to JSON (an object, or a JSON Schema). `logprobs` / `top_logprobs` give each token's
    log-probability (in the last chunk when streaming). `n` (up to 8) answers the prompt that many times, as rows
    of one batch (streamed once all are complete).
    """
    request.refuse_unsupported()
    messages = request.chat_messages()
    params = request.generation_params(service.default_params())
    adapters = request.adapter_choice(*await service.models.served_model_names())
    completion = _Completion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=request.model)

    def run(on_text: TextCallback | None) -> Awaitable[ChatResult]:
        return service.chat(messages, params, adapters, request.rag, on_text, request.collection, request.n or 1)

    if not request.stream:
        return _response(completion, await watch.run(run(None)), request.rag)
    stream = await start_streaming(watch, run)
    return StreamingResponse(
        _chunks(completion, stream, with_sources=request.rag, include_usage=request.include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


@router.post(
    "/v1/embeddings", response_model=EmbeddingResponse, responses=error_responses(404, 503, body=True, envelope=OPENAI)
)
async def embeddings(request: EmbeddingRequest, service: Service) -> EmbeddingResponse:
    """Create embeddings, as OpenAI's API does, with the embedder the documents are searched with.

    `model` is EMBEDDING_MODEL, with or without its `embedded:` / `ollama:` prefix. Vectors have unit length;
    `dimensions` keeps the first that many, renormalised. `encoding_format: "base64"` sends each vector as
    little-endian float32 bytes in base64. `usage` counts whitespace-separated words: the embedder reports no
    token counts. Token-id inputs are refused with 400.
    """
    texts = request.texts()
    if request.model not in (service.embedder.name, service.embedding_name):
        raise ModelNotFoundError(
            f"model {request.model!r} is not an embedding model served here; use {service.embedding_name!r}"
        )
    embedded = await service.embed(texts, request.dimensions)
    data = [
        Embedding(index=index, embedding=_encoded(vector, request.encoding_format))
        for index, vector in enumerate(embedded.vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=embedded.words, total_tokens=embedded.words)
    return EmbeddingResponse(data=data, model=request.model, usage=usage)


def _encoded(vector: np.ndarray, encoding_format: EncodingFormat) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(value) for value in vector]


@router.get("/v1/models", response_model=ModelList, responses=error_responses(envelope=OPENAI))
async def list_models(service: Service) -> ModelList:
    """The models `model` may name: the base model first, then each adapter with `parent` = the base model."""
    return _model_list(*await service.models.served_model_names())


@router.get("/models", response_model=ModelList, include_in_schema=False)
async def list_models_unversioned(service: Service) -> ModelList:
    """Same as `GET /v1/models`, for clients whose base URL lacks `/v1`."""
    return _model_list(*await service.models.served_model_names())


def _model_list(base_name: str, adapter_names: list[str]) -> ModelList:
    created = int(time.time())
    base = ModelCard(id=base_name, created=created, root=base_name, parent=None)
    adapters = [ModelCard(id=name, created=created, root=base_name, parent=base_name) for name in adapter_names]
    return ModelList(data=[base, *adapters])


def _response(completion: _Completion, chat: ChatResult, with_sources: bool) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=completion.id,
        created=completion.created,
        model=completion.model,
        choices=[
            ChatCompletionChoice(
                index=index,
                message=ChatCompletionMessage(
                    content=result.text if result.text or not result.tool_calls else None,
                    tool_calls=[ChatCompletionMessageToolCall.of(call) for call in result.tool_calls] or None,
                ),
                finish_reason=_FINISH_REASONS[result.finish_reason],
                logprobs=ChoiceLogprobs.of(result.logprobs),
            )
            for index, result in enumerate(chat.choices)
        ],
        usage=_usage(chat.choices),
        sources=_sources(chat.sources) if with_sources else None,
        notice=chat.result.notice,
    )


async def _chunks(
    completion: _Completion, stream: PieceStream[ChatResult], *, with_sources: bool, include_usage: bool
) -> AsyncIterator[str]:
    yield _chunk(completion, 0, ChoiceDelta(role="assistant", content=""))
    async for piece in stream.pieces():  # one choice: its text as it is generated
        yield _chunk(completion, 0, ChoiceDelta(content=piece))
    try:
        chat = stream.result
    except Exception as error:  # the stream has begun: the error becomes its last event
        yield _sse(OPENAI.body(describe_error(error)))
        yield _DONE
        return
    for index, result in enumerate(chat.choices):
        last = index == len(chat.choices) - 1
        if len(chat.choices) > 1:  # several choices are generated whole, then sent one after the other
            delta = ChoiceDelta(role="assistant", content=result.text) if index else ChoiceDelta(content=result.text)
            yield _chunk(completion, index, delta)
        # A reply's calls come once it is complete (the engine reads them from the whole reply): the id, type and
        # name of each first, then its arguments, as OpenAI streams them and its client and LangChain assemble them.
        for number, call in enumerate(result.tool_calls):
            yield _chunk(completion, index, ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(
                index=number, id=call.id, type="function", function=ChoiceDeltaFunctionCall(name=call.name))]))
            yield _chunk(completion, index, ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(
                index=number, function=ChoiceDeltaFunctionCall(arguments=call.arguments))]))
        yield _chunk(
            completion,
            index,
            ChoiceDelta(),
            finish_reason=_FINISH_REASONS[result.finish_reason],
            logprobs=ChoiceLogprobs.of(result.logprobs),
            sources=_sources(chat.sources) if with_sources and last else None,
            notice=chat.result.notice if last else None,
        )
    if include_usage:
        yield _sse(_base_chunk(completion, choices=[], usage=_usage(chat.choices)))
    yield _DONE


def _chunk(
    completion: _Completion,
    index: int,
    delta: ChoiceDelta,
    finish_reason: OpenAIFinishReason | None = None,
    sources: list[SourceDocument] | None = None,
    notice: str | None = None,
    logprobs: ChoiceLogprobs | None = None,
) -> str:
    choice = ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)
    return _sse(_base_chunk(completion, choices=[choice], sources=sources, notice=notice))


def _base_chunk(completion: _Completion, **fields: Any) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=completion.id, created=completion.created, model=completion.model, **fields)


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def _usage(choices: tuple[GenerationResult, ...]) -> CompletionUsage:
    """The prompt once (its choices share it), every choice's tokens."""
    prompt, completion = choices[0].prompt_tokens, sum(result.completion_tokens for result in choices)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sources(hits: list[SearchHit]) -> list[SourceDocument]:
    return [SourceDocument.from_hit(hit) for hit in hits]
