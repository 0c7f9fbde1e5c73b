"""The remote backend: any OpenAI-compatible chat-completions engine (vLLM, SGLang, LoRAX, llama.cpp's server,
another lora-rag), with its LoRA adapters chosen by model name.

The base model is REMOTE_MODEL (or the first of its /v1/models); every other name in its /v1/models is an
adapter, as vLLM lists `--lora-modules` and runtime-loaded adapters. Streams are passed on as they arrive, and a
cancelled request closes its connection, which makes the engine stop generating it. The engine's errors become
ours here: unreachable 503, timeout 504, unknown model 404, its 429 with Retry-After, anything else 502 with
its message. What it sends is bounded: a reply is read up to a size that fits its `max_tokens` (a model list up to
_LISTING_MAX_BYTES), a stream up to `max_tokens` pieces plus a margin; beyond either, 502 and the connection is
closed (a `Content-Length: 10 GB` reply was once read to 3 GB, and a stream relayed 3.2 GB for 16 tokens).

Written on httpx directly rather than the `openai` client: the client retries on its own terms (5xx and
timeouts as well) and hides the HTTP status a mapping needs.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from app.config import Settings
from app.errors import (
    AppError,
    BackendTimeoutError,
    BackendUnavailableError,
    NotFoundError,
    NotSupportedError,
    UpstreamError,
    UpstreamRateLimitedError,
    ValidationFailedError,
)
from app.llm.base import (
    AdapterSpec,
    ChatMessage,
    ComponentHealth,
    FinishReason,
    GenerationBackend,
    GenerationParams,
    GenerationResult,
    TextCallback,
    TokenChoice,
    TokenLogprob,
    ToolCall,
    ToolUse,
    openai_response_format,
)
from app.llm.tools import openai_tool

logger = logging.getLogger(__name__)

_HEALTH_TIMEOUT_SECONDS = 3.0
_BACKOFF_SECONDS = 0.25  # doubled after each failed connection attempt
_MAX_ERROR_CHARS = 500
#: A chat reply may hold this much, plus _REPLY_BYTES_PER_TOKEN for each token asked for: room for any engine's
#: JSON around the text (ids, usage, logprobs), far from what a runaway engine sends.
_REPLY_BASE_BYTES = 64 * 1024
_REPLY_BYTES_PER_TOKEN = 4096
#: The most a model list, an adapter route's or an error's reply may hold.
_LISTING_MAX_BYTES = 4 * 2**20
#: Streamed pieces beyond `max_tokens` tolerated (an engine may send a piece without a token of its own).
_STREAMED_PIECES_MARGIN = 16


class _Function(BaseModel):
    name: str
    arguments: str


class _ToolCall(BaseModel):
    id: str
    function: _Function


class _Message(BaseModel):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None

    def choice(self) -> TokenChoice:
        exact = bytes(self.bytes) if self.bytes is not None else self.token.encode()
        return TokenChoice(self.token, exact, self.logprob)


class _TokenLogprob(_TopLogprob):
    top_logprobs: list[_TopLogprob] = []


class _Logprobs(BaseModel):
    content: list[_TokenLogprob] | None = None


class _Choice(BaseModel):
    message: _Message | None = None  # a reply's
    delta: _Message | None = None  # a streamed chunk's
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None

    def token_logprobs(self) -> tuple[TokenLogprob, ...]:
        entries = self.logprobs.content if self.logprobs is not None and self.logprobs.content else []
        return tuple(TokenLogprob(entry.choice(), tuple(top.choice() for top in entry.top_logprobs))
                     for entry in entries)


class _Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Completion(BaseModel):
    """What is read of a chat completion or one of its streamed chunks; any other shape is the engine's fault."""

    choices: list[_Choice]
    usage: _Usage | None = None


class _ModelEntry(BaseModel):
    id: str


class _ModelList(BaseModel):
    data: list[_ModelEntry] = []


_Reply = TypeVar("_Reply", bound=BaseModel)


class RemoteAdapterNotFoundError(NotFoundError):
    code = "adapter_not_found"


class _RouteMissingError(NotFoundError):
    """The engine has no such route (a web framework's bare 404 or 405), as opposed to an unknown model."""


#: what web frameworks answer for a route they do not have (FastAPI/Starlette, aiohttp, llama.cpp's server)
_ROUTE_MISSING = frozenset({"not found", "method not allowed", "404: not found", "file not found",
                            "404 page not found"})


class RemoteBackend(GenerationBackend):
    """Chat completions on the engine at REMOTE_BASE_URL."""

    name = "remote"

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.remote_base_url
        key = settings.remote_api_key.get_secret_value()
        self._client = httpx.AsyncClient(
            base_url=self.base_url + "/",
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(settings.remote_read_timeout, connect=settings.remote_connect_timeout),
        )
        self._configured_model = settings.remote_model
        self._secret = key  # taken out of the engine's error texts before they reach a caller
        self._retries = settings.remote_retries
        self._models_ttl = settings.remote_models_ttl_seconds
        self._models: list[str] = []
        self._models_read_at = -float("inf")

    async def generate(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        adapters: AdapterSpec | None = None,
        on_text: TextCallback | None = None,
    ) -> GenerationResult:
        model, adapter = await self._model_for(adapters)
        body: dict[str, Any] = {
            "model": model,
            "messages": [_openai_message(message) for message in messages],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM's and llama.cpp's server's extension
        if params.min_p:
            body["min_p"] = params.min_p
        penalties = params.penalties
        if penalties.presence or penalties.frequency:
            body.update(presence_penalty=penalties.presence, frequency_penalty=penalties.frequency)
        if penalties.repetition != 1.0 and penalties.last_n != 0:
            # vLLM's extra sampling field (over prompt and answer: it has no window), llama.cpp's server names.
            body.update(repetition_penalty=penalties.repetition, repeat_penalty=penalties.repetition,
                        repeat_last_n=penalties.last_n)
        if params.constraint is not None:  # vLLM and llama.cpp's server take OpenAI's shape
            body["response_format"] = openai_response_format(params.constraint)
        if params.tools is not None:
            body.update(_openai_tools(params.tools))
        if params.logprobs is not None:
            body.update(logprobs=True, top_logprobs=params.logprobs)
        limit = _reply_limit(params.max_new_tokens)
        # A reply with calls or log-probabilities is taken whole (then streamed), as on the local model.
        if on_text is None or params.tools is not None or params.logprobs is not None:
            reply = self._parsed(_Completion, await self._request("POST", "chat/completions", json_body=body,
                                                                   max_bytes=limit))
            choice = reply.choices[0] if reply.choices else _Choice()
            message = choice.message or _Message()
            calls = tuple(ToolCall(call.id, call.function.name, call.function.arguments)
                          for call in message.tool_calls or [])
            if on_text is not None and message.content:
                on_text(message.content)
            result = self._result(message.content or "", choice.finish_reason, reply.usage, adapter, calls)
            return replace(result, logprobs=choice.token_logprobs()) if params.logprobs is not None else result
        body.update(stream=True, stream_options={"include_usage": True})
        pieces: list[str] = []
        finish: str | None = None
        usage: _Usage | None = None
        events = 0
        most_pieces = params.max_new_tokens + _STREAMED_PIECES_MARGIN
        async with self._stream("chat/completions", body, limit) as lines:
            async for event in _events(lines):
                events += 1
                chunk = self._parsed(_Completion, event)
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    piece = choice.delta.content if choice.delta is not None and choice.delta.content else ""
                    if piece:
                        if len(pieces) == most_pieces:
                            raise UpstreamError(
                                f"the remote engine at {self.base_url} streamed more than {most_pieces} pieces "
                                f"for max_tokens={params.max_new_tokens}; the answer was cut there"
                            )
                        pieces.append(piece)
                        on_text(piece)
                    finish = choice.finish_reason or finish
        if not events:
            raise UpstreamError(f"the remote engine at {self.base_url} answered the stream with no events")
        return self._result("".join(pieces), finish, usage, adapter)

    async def health(self) -> ComponentHealth:
        """Reachable, and its model list holds the base model."""
        try:
            # httpx's timeout bounds each read, not the whole reply: an engine sending a byte a second would hold
            # the probe (and /health/ready) for as long as it likes.
            models = await asyncio.wait_for(self.model_names(refresh=True, timeout=_HEALTH_TIMEOUT_SECONDS),
                                            _HEALTH_TIMEOUT_SECONDS)
        except TimeoutError:
            return ComponentHealth(ok=False, detail=f"the remote engine at {self.base_url} did not answer "
                                                    f"/v1/models within {_HEALTH_TIMEOUT_SECONDS:g} s")
        except AppError as error:
            return ComponentHealth(ok=False, detail=error.message)
        base = self._configured_model or models[0]
        if base not in models:
            return ComponentHealth(ok=False, detail=f"REMOTE_MODEL={base!r} is not served at {self.base_url}")
        return ComponentHealth(ok=True, detail=f"reachable at {self.base_url}, base model {base}")

    def describe(self) -> dict[str, Any]:
        return {"remote_base_url": self.base_url, "remote_model": self._configured_model or (self._models or [""])[0]}

    async def close(self) -> None:
        await self._client.aclose()

    # Adapters, as the engine names them

    async def model_names(self, *, refresh: bool = False, timeout: float | None = None) -> list[str]:
        """The engine's /v1/models ids (cached REMOTE_MODELS_TTL_SECONDS), base model first when it is listed."""
        if refresh or time.monotonic() - self._models_read_at > self._models_ttl or not self._models:
            reply = self._parsed(_ModelList, await self._request("GET", "models", timeout=timeout))
            ids = [entry.id for entry in reply.data]
            if not ids:
                raise UpstreamError(f"the remote engine at {self.base_url} lists no models")
            base = self._configured_model or ids[0]
            self._models = [base, *[name for name in ids if name != base]] if base in ids else ids
            self._models_read_at = time.monotonic()
        return self._models

    @property
    def cached_adapter_names(self) -> list[str]:
        """The adapters of the model list as last read (none before the first read)."""
        return self._models[1:]

    async def adapter_names(self) -> list[str]:
        """The engine's models other than the base (the first listed: REMOTE_MODEL when the engine serves it)."""
        return (await self.model_names())[1:]

    async def load_adapter(self, name: str, path: str) -> None:
        """vLLM's runtime loading (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`); the path is on the engine's machine."""
        await self._adapter_route("load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload_adapter(self, name: str) -> None:
        await self._adapter_route("unload_lora_adapter", {"lora_name": name})

    async def _adapter_route(self, route: str, body: dict[str, str]) -> None:
        try:
            # vLLM answers these in plain text ("Success: LoRA adapter ... added"), not JSON.
            response, text = await self._send("POST", route, _LISTING_MAX_BYTES, json=body)
            self._raise_for(response, text)
        except _RouteMissingError:
            raise NotSupportedError(
                f"the remote engine at {self.base_url} has no /{route} (vLLM has it with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): load adapters there with its own options"
            ) from None
        self._models_read_at = -float("inf")  # its model list changed

    async def _model_for(self, adapters: AdapterSpec | None) -> tuple[str, str]:
        """The engine's model name for this request, and the adapter name for the result ("" for the base)."""
        models = await self.model_names()
        base = self._base_model(models)
        if base not in models:  # the operator's setting, not the caller's mistake
            raise BackendUnavailableError(
                f"REMOTE_MODEL={base!r} is not served by the remote engine at {self.base_url}; it serves: "
                f"{', '.join(models)}"
            )
        if not adapters:
            return base, ""
        if len(adapters) > 1 or adapters[0][1] != 1.0:
            raise ValidationFailedError(
                "weighted adapter mixes are not supported by the remote backend: an OpenAI-compatible engine "
                "runs one adapter per request, named as its model; name one adapter, or use the lora backend"
            )
        name = adapters[0][0]
        if name not in models:
            models = await self.model_names(refresh=True)  # loaded there since the list was read
        if name not in models:
            listed = ", ".join(name for name in models if name != base) or "none"
            raise RemoteAdapterNotFoundError(
                f"adapter {name!r} is not served by the remote engine; its adapters: {listed}"
            )
        return name, name

    def _base_model(self, models: list[str]) -> str:
        return self._configured_model or models[0]

    def _result(self, text: str, finish: str | None, usage: _Usage | None, adapter: str,
                calls: tuple[ToolCall, ...] = ()) -> GenerationResult:
        counts = usage or _Usage()
        reason: FinishReason = "tool_calls" if calls else "length" if finish == "length" else "stop"
        return GenerationResult(
            text=text, model_used="remote", prompt_tokens=counts.prompt_tokens, tool_calls=calls,
            completion_tokens=counts.completion_tokens, finish_reason=reason, adapters=adapter,
        )

    def _parsed(self, shape: type[_Reply], payload: dict[str, Any]) -> _Reply:
        """`payload` read as `shape`; any other shape is the engine's fault (502), never ours (500)."""
        try:
            return shape.model_validate(payload)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "its body"
            raise UpstreamError(
                f"the remote engine at {self.base_url} answered in an unexpected shape ({where}: {first['msg']})"
            ) from None

    # HTTP, with the engine's failures turned into ours

    async def _request(
        self, method: str, path: str, *, json_body: dict[str, Any] | None = None, timeout: float | None = None,
        max_bytes: int = _LISTING_MAX_BYTES,
    ) -> dict[str, Any]:
        options: dict[str, Any] = {"json": json_body} if json_body is not None else {}
        if timeout is not None:
            options["timeout"] = timeout
        response, text = await self._send(method, path, max_bytes, **options)
        self._raise_for(response, text)
        try:
            payload = json.loads(text)
        except ValueError:
            raise UpstreamError(f"the remote engine at {self.base_url} answered {path} with no JSON") from None
        if not isinstance(payload, dict):
            raise UpstreamError(f"the remote engine at {self.base_url} answered {path} with JSON that is no object")
        return payload

    async def _send(self, method: str, path: str, max_bytes: int, **options: Any) -> tuple[httpx.Response, str]:
        """The engine's reply and its text, read up to `max_bytes` (UpstreamError beyond)."""
        request = self._client.build_request(method, path, **options)
        response = await self._with_retries(lambda: self._client.send(request, stream=True))
        try:
            return response, await _read_capped(response, self.base_url, max_bytes)
        finally:
            await response.aclose()

    @asynccontextmanager
    async def _stream(self, path: str, body: dict[str, Any], max_bytes: int) -> AsyncIterator[AsyncIterator[str]]:
        request = self._client.build_request("POST", path, json=body)
        response = await self._with_retries(lambda: self._client.send(request, stream=True))
        try:
            if response.status_code >= 400:
                self._raise_for(response, await _read_capped(response, self.base_url, _LISTING_MAX_BYTES))
            yield _lines(response, self.base_url, max_bytes)
        finally:
            await response.aclose()  # also on cancellation: the engine sees the connection close and stops

    async def _with_retries(self, send: Any) -> httpx.Response:
        """`send()`, retried with backoff when the connection cannot be made (never once the engine has it)."""
        for attempt in range(self._retries + 1):
            try:
                response: httpx.Response = await send()
                return response
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                if attempt == self._retries:
                    raise BackendUnavailableError(
                        f"the remote engine is not reachable at {self.base_url} ({type(error).__name__} after "
                        f"{attempt + 1} attempts)"
                    ) from None
                await asyncio.sleep(_BACKOFF_SECONDS * 2**attempt)
            except httpx.TimeoutException:
                raise BackendTimeoutError(f"the remote engine at {self.base_url} did not answer in time") from None
            except httpx.HTTPError as error:
                raise BackendUnavailableError(
                    f"the remote engine at {self.base_url} failed: {type(error).__name__}"
                ) from None
        raise AssertionError("unreachable")

    def _raise_for(self, response: httpx.Response, text: str) -> None:
        status = response.status_code
        if status < 300:
            return
        if status < 400:
            raise UpstreamError(
                f"the remote engine at {self.base_url} answered {status}, a redirect (to "
                f"{response.headers.get('location', 'nowhere said')[:200]}): set REMOTE_BASE_URL to where it serves"
            )
        message = _error_message(text)[:_MAX_ERROR_CHARS]
        if self._secret:
            message = message.replace(self._secret, "***")
        where = f"the remote engine at {self.base_url}"
        if status == 405 or (status == 404 and message.strip().lower() in _ROUTE_MISSING):
            raise _RouteMissingError(f"{where} has no {response.request.url.path}")
        if status == 404:
            raise NotFoundError(f"{where}: {message}")
        if status == 429:
            retry = response.headers.get("retry-after", "")
            seconds = int(retry) if retry.isascii() and retry.isdigit() and len(retry) <= 6 else 1
            raise UpstreamRateLimitedError(f"{where} is rate limiting: {message}", retry_after=seconds)
        if status in (408, 504):
            raise BackendTimeoutError(f"{where} timed out: {message}")
        if status == 503:
            raise BackendUnavailableError(f"{where} cannot serve now: {message}")
        raise UpstreamError(f"{where} answered {status}: {message}")


def _openai_tools(tools: ToolUse) -> dict[str, Any]:
    """A request's tools and tool choice as OpenAI's API (and vLLM's, llama.cpp's server's) takes them."""
    choice: str | dict[str, Any] = tools.choice
    if tools.choice == "named":
        choice = {"type": "function", "function": {"name": tools.name}}
    return {"tools": [openai_tool(tool) for tool in tools.tools], "tool_choice": choice,
            "parallel_tool_calls": tools.parallel}


def _openai_message(message: ChatMessage) -> dict[str, Any]:
    """A message as OpenAI's API takes it, the calls an assistant made and the call a tool result answers too."""
    shown: dict[str, Any] = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        shown["tool_calls"] = [{"id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}}
                               for call in message.get("tool_calls", ())]
    if "tool_call_id" in message:
        shown["tool_call_id"] = message["tool_call_id"]
    return shown


def _error_message(text: str) -> str:
    """The message of an error body in OpenAI's envelope, ours or Ollama's, else the text itself."""
    try:
        payload = json.loads(text)
    except ValueError:
        return text.strip() or "(no message)"
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if payload.get("message"):
            return str(payload["message"])
        if isinstance(error, str):
            return error
    return text.strip()


def _reply_limit(max_tokens: int) -> int:
    """The most bytes a chat reply (or stream) for `max_tokens` tokens may hold."""
    return _REPLY_BASE_BYTES + max_tokens * _REPLY_BYTES_PER_TOKEN


async def _body(response: httpx.Response, base_url: str, max_bytes: int) -> AsyncIterator[bytes]:
    """The reply's bytes as they arrive, its failures turned into ours; past `max_bytes` (or a Content-Length
    over it), UpstreamError before more is read."""
    declared = response.headers.get("content-length", "")
    too_large = UpstreamError(f"the remote engine at {base_url} sent a reply over {max_bytes} bytes; refused")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    received = 0
    try:
        async for piece in response.aiter_bytes():
            received += len(piece)
            if received > max_bytes:
                raise too_large
            yield piece
    except httpx.TimeoutException:
        raise BackendTimeoutError(f"the remote engine at {base_url} stopped sending its answer") from None
    except httpx.HTTPError as error:
        raise BackendUnavailableError(
            f"the remote engine at {base_url} broke off its answer ({type(error).__name__})"
        ) from None


async def _read_capped(response: httpx.Response, base_url: str, max_bytes: int) -> str:
    return b"".join([piece async for piece in _body(response, base_url, max_bytes)]).decode("utf-8", "replace")


async def _lines(response: httpx.Response, base_url: str, max_bytes: int) -> AsyncIterator[str]:
    """The reply's lines as they arrive (httpx's own line reader would hold a line of any length in memory)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    async for piece in _body(response, base_url, max_bytes):
        *lines, pending = (pending + decoder.decode(piece)).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending.removesuffix("\r")


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an OpenAI Server-Sent Events stream, up to `data: [DONE]`."""
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            continue
        if isinstance(event, dict):
            if isinstance(event.get("error"), dict):
                raise UpstreamError(f"the remote engine broke off its answer: {_error_message(data)}")
            yield event
