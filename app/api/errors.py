"""The one place where errors become HTTP responses `{"error": code, "message": text}`."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import AppError

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": code, "message": message}, headers=headers)


def _describe_validation(error: RequestValidationError) -> tuple[int, str, str]:
    problems = error.errors()
    if any(problem.get("type") == "json_invalid" for problem in problems):
        return 400, "invalid_json", "the request body is not valid JSON"
    parts = []
    for problem in problems:
        location = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {problem.get('msg', 'invalid')}")
    return 422, "validation_error", "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, error: AppError) -> JSONResponse:
        if error.status_code >= 500:
            logger.warning("%s: %s", error.code, error.message)
        retry = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
        return error_response(error.status_code, error.code, error.message, retry)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        status, code, message = _describe_validation(error)
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(error.status_code, "http_error")
        # Starlette's own headers stay: `Allow` on a 405 (RFC 9110), `WWW-Authenticate` on a 401.
        return error_response(error.status_code, code, str(error.detail), error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; the server log has the details")
