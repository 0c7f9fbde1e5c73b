"""The Ollama-compatible API on the service's own port: /api/chat, /api/generate, /api/tags, /api/show, /api/ps,
/api/version, /api/embed.

`ollama.Client(host=<server>)`, LangChain's `ChatOllama(base_url=<server>)` and other Ollama clients work
against it unchanged. The models are the local base model and each adapter (`<name>:latest` or `<name>`), and
`<name>:rag` for answers from the indexed documents (as is `options.rag: true`); /api/embed uses the embedder
the documents are searched with. Generations always run on the local model, whichever backend /ask uses.
Errors are Ollama's `{"error": "..."}` with its statuses (app/api/errors.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.api.deps import get_rag_service
from app.api.disconnect import Watch
from app.api.errors import OLLAMA, describe_error
from app.api.ollama_schemas import (
    OLLAMA_API_VERSION,
    AssistantMessage,
    ChatChunk,
    ChatResponse,
    EmbedResponse,
    GenerateChunk,
    GenerateResponse,
    GenerationFields,
    GenerationStats,
    ModelDetails,
    ModelEntry,
    OllamaChatRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaLogprob,
    OllamaShowRequest,
    OllamaToolCall,
    PsResponse,
    RunningModel,
    ShowResponse,
    TagsResponse,
    VersionResponse,
)
from app.api.openai_schemas import ModelNotFoundError
from app.api.schemas import error_responses
from app.api.streaming import PieceStream, start_streaming
from app.errors import BadRequestError
from app.llm.base import AdapterSpec, ChatMessage, GenerationResult, TextCallback, ToolCall
from app.rag.service import ChatResult, RAGService

router = APIRouter(prefix="/api", tags=["ollama"])
Service = Annotated[RAGService, Depends(get_rag_service)]
LATEST, RAG = "latest", "rag"
_STARTED = datetime.now(UTC)  # the models' `modified_at`: they are as new as this process
_NEVER = _STARTED + timedelta(days=365 * 100)  # `expires_at` of /api/ps: nothing is unloaded on a timer here


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class _Model:
    """What a request's `model` names."""

    name: str  # as given, echoed in the answer
    served: str  # the base model's or the adapter's name, without the tag
    adapters: AdapterSpec  # (): the base model alone
    rag: bool


def _split_tag(model: str) -> tuple[str, str]:
    """`name:tag` as (name, tag) for our two tags; any other colon is part of the name."""
    name, colon, tag = model.rpartition(":")
    return (name, tag) if colon and tag in (LATEST, RAG) else (model, LATEST)


def _not_found(model: str) -> ModelNotFoundError:
    return ModelNotFoundError(f'model "{model}" not found, try pulling it first')  # Ollama's words


async def _resolve(model: str, service: RAGService, verb: str) -> _Model:
    served, tag = _split_tag(model)
    base, adapters = await service.models.served_model_names()
    if served == base:
        spec: AdapterSpec = ()
    elif served in adapters:
        spec = ((served, 1.0),)
    elif served == _split_tag(service.embedding_name)[0]:
        raise BadRequestError(f'"{model}" does not support {verb}')  # Ollama's answer for an embedding model
    else:
        raise _not_found(model)
    return _Model(name=model, served=served, adapters=spec, rag=tag == RAG)


class _Clock:
    """Ollama's durations (ns): prompt evaluation until the first piece, evaluation from there to the end."""

    def __init__(self) -> None:
        self._started = time.perf_counter_ns()
        self._first: int | None = None

    def watching(self, sink: TextCallback | None) -> TextCallback:
        def on_text(piece: str) -> None:
            if self._first is None:
                self._first = time.perf_counter_ns()
            if sink is not None:
                sink(piece)

        return on_text

    def stats(self, model: str, result: GenerationResult) -> dict[str, Any]:
        end = time.perf_counter_ns()
        first = self._first or end
        return {
            "model": model,
            "created_at": _rfc3339(datetime.now(UTC)),
            "done_reason": "length" if result.finish_reason == "length" else "stop",
            "total_duration": end - self._started,
            "prompt_eval_count": result.prompt_tokens,
            "prompt_eval_duration": first - self._started,
            "eval_count": result.completion_tokens,
            "eval_duration": end - first,
            "logprobs": OllamaLogprob.all_of(result.logprobs),
        }


@dataclass(frozen=True)
class _Shape:
    """Where a generation's text goes: chat answers in `message.content` (its calls in `message.tool_calls`),
    generate answers in `response`."""

    verb: str  # for "<model> does not support <verb>"
    piece: Callable[[str, str], BaseModel]  # (model, text) -> one streamed piece
    final: type[GenerationStats]
    text_field: Callable[[str, tuple[ToolCall, ...]], dict[str, Any]]  # (text, calls) -> the final's fields


_CHAT = _Shape(
    verb="chat",
    piece=lambda model, text: ChatChunk(model=model, created_at=_rfc3339(datetime.now(UTC)),
                                        message=AssistantMessage(content=text)),
    final=ChatResponse,
    text_field=lambda text, calls: {"message": AssistantMessage(
        content=text, tool_calls=[OllamaToolCall.of(call) for call in calls] or None)},
)
_GENERATE = _Shape(
    verb="generate",
    piece=lambda model, text: GenerateChunk(model=model, created_at=_rfc3339(datetime.now(UTC)), response=text),
    final=GenerateResponse,
    text_field=lambda text, calls: {"response": text},
)
_GENERATION_ERRORS = {
    **error_responses(404, 503, 504, body=True, envelope=OLLAMA),
    200: {"content": {"application/x-ndjson": {}}},
}


async def _answer(
    request: GenerationFields, messages: list[ChatMessage], shape: _Shape, service: RAGService, watch: Watch
) -> BaseModel | StreamingResponse:
    model = await _resolve(request.model, service, shape.verb)
    params = request.params(service.default_params())
    if request.load_only:
        # Ollama's "load the model" request: answered at once, with done_reason "load", once it is loaded.
        await service.models.backend_for(None, serves_adapters=True)
        return shape.final(model=model.name, created_at=_rfc3339(datetime.now(UTC)), done_reason="load",
                           **shape.text_field("", ()))
    clock = _Clock()
    use_rag = model.rag or request.rag_option

    def run(on_text: TextCallback | None) -> Awaitable[ChatResult]:
        return service.chat(messages, params, model.adapters, use_rag, clock.watching(on_text))

    if not request.stream:
        result = (await watch.run(run(None))).result
        return shape.final(**clock.stats(model.name, result), **shape.text_field(result.text, result.tool_calls))
    stream = await start_streaming(watch, run)
    return StreamingResponse(_lines(model.name, stream, shape, clock), media_type="application/x-ndjson")


async def _lines(model: str, stream: PieceStream[ChatResult], shape: _Shape, clock: _Clock) -> AsyncIterator[str]:
    async for piece in stream.pieces():
        yield _line(shape.piece(model, piece))
    try:
        result = stream.result.result
    except Exception as error:  # the stream has begun: Ollama ends it with an in-band error line
        yield _line(OLLAMA.body(describe_error(error)))
        return
    # The reply's calls, read once it is complete, come with the last line, as its message's tool_calls.
    yield _line(shape.final(**clock.stats(model, result), **shape.text_field("", result.tool_calls)))


def _line(item: BaseModel) -> str:
    return item.model_dump_json() + "\n"


@router.post("/chat", response_model=ChatResponse, responses=_GENERATION_ERRORS)
async def chat(request: OllamaChatRequest, service: Service, watch: Watch) -> BaseModel | StreamingResponse:
    """Ollama's chat: streamed NDJSON by default, one object with `stream: false`."""
    return await _answer(request, request.chat_messages(request.model), _CHAT, service, watch)


@router.post("/generate", response_model=GenerateResponse, responses=_GENERATION_ERRORS)
async def generate(request: OllamaGenerateRequest, service: Service, watch: Watch) -> BaseModel | StreamingResponse:
    """Ollama's completion of one `prompt` (with an optional `system`), through the model's chat template."""
    return await _answer(request, request.chat_messages(request.model), _GENERATE, service, watch)


def _entry(name: str, parent: str = "") -> ModelEntry:
    return ModelEntry(name=name, model=name, modified_at=_rfc3339(_STARTED), details=ModelDetails(parent_model=parent),
                      digest=hashlib.sha256(name.encode("utf-8")).hexdigest())


async def _entries(service: RAGService) -> list[ModelEntry]:
    base, adapters = await service.models.served_model_names()
    served = [(base, ""), *((name, base) for name in adapters)]
    models = [_entry(f"{name}:{tag}", parent) for name, parent in served for tag in (LATEST, RAG)]
    return [*models, _entry(service.embedding_name)]


@router.get("/tags", response_model=TagsResponse, responses=error_responses(envelope=OLLAMA))
async def tags(service: Service) -> TagsResponse:
    """The base model and every adapter, each as `<name>:latest` and `<name>:rag`, then the embedding model."""
    return TagsResponse(models=await _entries(service))


@router.get("/ps", response_model=PsResponse, responses=error_responses(envelope=OLLAMA))
async def ps(service: Service) -> PsResponse:
    """The models the local backend serves (it keeps them loaded: `expires_at` is far away)."""
    return PsResponse(models=[RunningModel(**entry.model_dump(), expires_at=_rfc3339(_NEVER))
                              for entry in await _entries(service)])


@router.post("/show", response_model=ShowResponse, responses=error_responses(400, 404, body=True, envelope=OLLAMA))
async def show(request: OllamaShowRequest, service: Service) -> ShowResponse:
    """One model's details and capabilities."""
    name = request.model or request.name
    if not name:
        raise BadRequestError("model is required")
    entry = next((e for e in await _entries(service) if _split_tag(e.name) == _split_tag(name)), None)
    if entry is None:
        raise ModelNotFoundError(f"model '{name}' not found")  # /api/show's own wording in Ollama
    embedding = entry.name == service.embedding_name
    return ShowResponse(
        modelfile=f"# served by lora-rag\nFROM {entry.name}\n",
        parameters="",
        template="",
        details=entry.details,
        model_info={"general.architecture": "", "general.parameter_count": 0},
        capabilities=["embedding"] if embedding else ["completion"],
        modified_at=entry.modified_at,
    )


@router.get("/version", response_model=VersionResponse, responses=error_responses(envelope=OLLAMA))
async def version() -> VersionResponse:
    """The Ollama API version this server follows."""
    return VersionResponse(version=OLLAMA_API_VERSION)


@router.post("/embed", response_model=EmbedResponse, responses=error_responses(400, 404, body=True, envelope=OLLAMA))
async def embed(request: OllamaEmbedRequest, service: Service) -> EmbedResponse:
    """Vectors from the embedder the documents are searched with (unit length, as Ollama's)."""
    started = time.perf_counter_ns()
    if _split_tag(request.model)[0] != _split_tag(service.embedding_name)[0]:
        raise _not_found(request.model)
    embeddings = await service.embed(request.texts, request.dimensions)
    return EmbedResponse(
        model=request.model,
        embeddings=embeddings.vectors.astype(float).tolist(),
        total_duration=time.perf_counter_ns() - started,
        prompt_eval_count=embeddings.words,
    )
