"""The one place where errors become HTTP responses, in the envelope of the API the path belongs to.

- ours, everywhere else: `{"error": code, "message": text}`;
- OpenAI's on `/v1/*`: `{"error": {"message", "type", "param", "code"}}`, so the official `openai` client raises
  its typed errors (`BadRequestError`, `NotFoundError`, `RateLimitError`, ...);
- Ollama's on `/api/*`: `{"error": text}`, which the `ollama` client raises as `ResponseError`.

OpenAI and Ollama never answer 422: a body that fails validation is their 400, so on their paths 422 becomes
400 (our own API keeps 422). `/api/v1/*` is ours, not Ollama's (the classification service); on
`/api/v1/inference/*` a body that fails validation is `invalid_request`, as that API documents.
The request guard, the exception handlers and the streaming routes (for an error after the stream began) all
build their bodies here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.api.visibility import shown_to
from app.errors import AppError

logger = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1"
OLLAMA_PREFIX = "/api"
OURS_UNDER_OLLAMA_PREFIX = "/api/v1"  # Ollama has no /api/v1; our classification service lives there
INFERENCE_PREFIX = "/api/v1/inference"

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
# OpenAI's error `type` by status (their API reference, "Error codes").
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error"}


@dataclass(frozen=True)
class ErrorInfo:
    """One error, whatever envelope it will travel in."""

    status: int
    code: str
    message: str
    param: str | None = None  # the request field at fault, when known


class ErrorResponse(BaseModel):
    error: str = Field(..., description="stable machine-readable code")
    message: str = Field(..., description="what went wrong and what to do")


class OpenAIError(BaseModel):
    message: str
    type: str = Field(..., description="invalid_request_error, authentication_error, rate_limit_error, ...")
    param: str | None = Field(..., description="the request field at fault, when known")
    code: str | None = Field(..., description="our stable machine-readable code")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError


class OllamaErrorResponse(BaseModel):
    error: str = Field(..., description="what went wrong")


class Envelope(Protocol):
    @property
    def model(self) -> type[BaseModel]:
        """The body's schema, for the routes' documented responses."""

    def status(self, status: int) -> int: ...

    def body(self, info: ErrorInfo) -> BaseModel: ...


class _Ours:
    model = ErrorResponse

    def status(self, status: int) -> int:
        return status

    def body(self, info: ErrorInfo) -> BaseModel:
        return ErrorResponse(error=info.code, message=info.message)


class _OpenAI:
    model = OpenAIErrorResponse

    def status(self, status: int) -> int:
        return 400 if status == 422 else status

    def body(self, info: ErrorInfo) -> BaseModel:
        status = self.status(info.status)
        kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return OpenAIErrorResponse(error=OpenAIError(message=info.message, type=kind, param=info.param, code=info.code))


class _Ollama:
    model = OllamaErrorResponse

    def status(self, status: int) -> int:
        return 400 if status == 422 else status

    def body(self, info: ErrorInfo) -> BaseModel:
        return OllamaErrorResponse(error=info.message)


_INTERNAL = ErrorInfo(500, "internal_error", "internal error; the server log has the details")
OURS: Envelope = _Ours()
OPENAI: Envelope = _OpenAI()
OLLAMA: Envelope = _Ollama()


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def envelope_for(path: str) -> Envelope:
    """The envelope of the API `path` belongs to (case-insensitive, as the guard matches paths)."""
    normal = path.lower()
    if _under(normal, OPENAI_PREFIX):
        return OPENAI
    if _under(normal, OLLAMA_PREFIX) and not _under(normal, OURS_UNDER_OLLAMA_PREFIX):
        return OLLAMA
    return OURS


def error_response(path: str, info: ErrorInfo, headers: Mapping[str, str] | None = None) -> JSONResponse:
    envelope = envelope_for(path)
    body = envelope.body(info).model_dump(mode="json")
    return JSONResponse(status_code=envelope.status(info.status), content=body, headers=headers)


def describe_error(error: BaseException) -> ErrorInfo:
    """An exception as the caller may see it: an `AppError` as it is, anything else as a logged 500 whose
    details stay in the server log. For errors that end a stream which has already begun."""
    if isinstance(error, AppError):
        if error.status_code >= 500:
            logger.warning("%s: %s", error.code, error.message)
        return ErrorInfo(error.status_code, error.code, error.message)
    logger.error("unexpected error", exc_info=error)
    return _INTERNAL


#: What an unknown field of one of our own request bodies is told (pydantic's "Extra inputs are not permitted").
_UNKNOWN_FIELD = "not a field of this request (the OpenAPI page at /docs lists them)"


def _describe_validation(error: RequestValidationError, path: str) -> ErrorInfo:
    problems = error.errors()
    if any(problem.get("type") == "json_invalid" for problem in problems):
        return ErrorInfo(400, "invalid_json", "the request body is not valid JSON")
    parts, fields = [], []
    for problem in problems:
        location = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        fields.append(location)
        message = _UNKNOWN_FIELD if problem.get("type") == "extra_forbidden" else problem.get("msg", "invalid")
        parts.append(f"{location}: {message}")
    code = "invalid_request" if _under(path.lower(), INFERENCE_PREFIX) else "validation_error"
    return ErrorInfo(422, code, "; ".join(parts), param=fields[0] if fields else None)


_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route answers on this path (HEAD wherever GET is: the request guard serves it)."""
    routes = request.app.router.routes
    allowed = [
        method for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]
    return sorted([*allowed, "HEAD"] if "GET" in allowed else allowed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(request: Request, error: AppError) -> JSONResponse:
        retry = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
        info = describe_error(error)
        if error.status_code >= 500:
            # A server-side failure's text may carry another system's words (a remote engine's error, a loader's
            # path): paths are cut for callers who are not admins, as /health cuts them.
            info = replace(info, message=shown_to(request, {"message": info.message})["message"])
        return error_response(request.url.path, info, retry)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, _describe_validation(error, request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(error.status_code, "http_error")
        # Starlette's own headers stay: `Allow` on a 405 (RFC 9110), `WWW-Authenticate` on a 401.
        headers = dict(error.headers or {})
        if error.status_code == 405:
            # Starlette names only the methods of the first route on the path; a path served by several
            # routes (GET and POST /documents) allows all of theirs.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(request.url.path, ErrorInfo(error.status_code, code, str(error.detail)), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, _INTERNAL)
