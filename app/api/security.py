"""The guard in front of every route: API keys, per-key rate limits, body size, JSON bodies.

It is ASGI middleware rather than per-route dependencies so that nothing can be registered unguarded:
every path needs a user key except liveness/readiness, and admin paths need an admin key. Paths are
normalised first (percent-decoding, case, repeated and trailing slashes) so a variant of an admin path
cannot slip past as a user path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

from app.config import Settings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health/live", "/health/ready"})
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
ADMIN_PREFIX = "/admin"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def normalise_path(path: str) -> str:
    decoded = unquote(unquote(path))
    while "//" in decoded:
        decoded = decoded.replace("//", "/")
    return (decoded.rstrip("/") or "/").lower()


def required_role(path: str) -> str:
    """'open', 'user' or 'admin' for a request path."""
    normal = normalise_path(path)
    if normal in OPEN_PATHS:
        return "open"
    if normal in ADMIN_PATHS or normal == ADMIN_PREFIX or normal.startswith(ADMIN_PREFIX + "/"):
        return "admin"
    return "user"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class _KeyRing:
    """Keys kept only as hashes; a lookup compares against every key in constant time."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(key) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def contains(self, digest: bytes) -> bool:
        found = False
        for candidate in self._digests:  # no early exit: the time does not depend on which key matched
            found |= hmac.compare_digest(candidate, digest)
        return found


class _RateLimiter:
    """A token bucket per caller: `per_minute` requests a minute, bursts up to the same number."""

    def __init__(self, per_minute: int) -> None:
        self._rate = per_minute / 60.0
        self._capacity = float(per_minute)
        self._buckets: dict[bytes, tuple[float, float]] = {}

    def retry_after(self, caller: bytes) -> int | None:
        """None when the request may go ahead, else the seconds to wait."""
        now = time.monotonic()
        tokens, last = self._buckets.get(caller, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self._rate))
        self._buckets[caller] = (tokens - 1.0, now)
        if len(self._buckets) > 10_000:  # forget callers whose bucket is full again
            full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self._rate >= self._capacity]
            for stale in full:
                del self._buckets[stale]
        return None


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self._app = app
        self._admin_keys = _KeyRing(settings.admin_api_key_list)
        self._user_keys = _KeyRing(settings.api_key_list)
        self._auth = bool(self._admin_keys or self._user_keys)
        self._limiter = _RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
        self._max_body = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        role = required_role(scope.get("raw_path", b"").decode("latin-1") or scope["path"])
        caller = _digest(f"client:{(scope.get('client') or ('?',))[0]}")
        if role != "open" and self._auth:
            key = _bearer_key(scope)
            if key is None:
                await _reply(send, 401, "unauthorized", "send an API key as `Authorization: Bearer <key>`",
                             {"WWW-Authenticate": "Bearer"})
                return
            caller = _digest(key)
            is_admin = self._admin_keys.contains(caller)
            if not (is_admin or self._user_keys.contains(caller)):
                await _reply(send, 401, "unauthorized", "the API key is not valid", {"WWW-Authenticate": "Bearer"})
                return
            if role == "admin" and not is_admin:
                await _reply(send, 403, "forbidden", "this route needs an admin API key")
                return
        if role != "open" and self._limiter is not None:
            wait = self._limiter.retry_after(caller)
            if wait is not None:
                await _reply(send, 429, "rate_limited", f"too many requests; retry in {wait} s",
                             {"Retry-After": str(wait)})
                return
        if scope["method"] in _BODY_METHODS:
            body = await _read_body(receive, self._max_body)
            if body is None:
                await _reply(send, 413, "payload_too_large",
                             f"the request body is over the limit of MAX_BODY_BYTES={self._max_body} bytes")
                return
            scope = _as_json(scope)
            receive = _replay(body, receive)
        await self._app(scope, receive, send)


def _bearer_key(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes (nothing more is read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, original: Receive) -> Receive:
    """Hand the app the body read here, then pass through to the real channel (so a streaming
    response still learns when the client really disconnects)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive


def _as_json(scope: Scope) -> Scope:
    """Bodies are JSON on every route: `curl -d '{...}'` sends form content-type, which would otherwise
    make FastAPI refuse a valid JSON question."""
    current = dict(scope.get("headers", [])).get(b"content-type", b"")
    if b"json" in current:
        return scope
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


async def _reply(send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": code, "message": message}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
