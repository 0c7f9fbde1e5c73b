"""The guard in front of every route: API keys, per-key rate limits, throttled key guessing, body size,
JSON bodies, HEAD as GET.

It is ASGI middleware rather than per-route dependencies so that nothing can be registered unguarded:
every path needs a user key except liveness/readiness, and admin paths need an admin key. Paths are
normalised first (percent-decoding, case, repeated and trailing slashes) so a variant of an admin path
cannot slip past as a user path. The caller's role is left in the request's state for routes that show
admins more (`app/api/visibility.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal
from urllib.parse import unquote

from app.api.errors import ErrorInfo, error_response
from app.api.visibility import ROLE_STATE_KEY
from app.config import Settings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

METRICS_PATH = "/metrics"
# /metrics is open by default so that Prometheus scrapes it without a key (it shows no key, query or document
# text); METRICS_REQUIRE_KEY takes it out of this set.
OPEN_PATHS = frozenset({"/health/live", "/health/ready", METRICS_PATH, "/"})
# The web page and its scripts hold no secret (the caller types a key into the page, which sends it as Bearer).
OPEN_PREFIXES = ("/web/",)
# /switch_model changes the backend for every caller, so it is an operator's action; a request's own
# `use_lora` stays a user's choice.
ADMIN_PATHS = frozenset({
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/switch_model",
    # Loading and unloading a classifier changes what every caller's predictions can use.
    "/api/v1/inference/models/load", "/api/v1/inference/models/unload",
})
# The documents a service answers from are the operator's to change, and listing them shows file names.
ADMIN_PREFIXES = ("/admin", "/documents")
UPLOAD_PATH = "/documents"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CallerRole = Literal["admin", "user", "anonymous"]


def normalise_path(path: str) -> str:
    decoded = unquote(unquote(path))
    while "//" in decoded:
        decoded = decoded.replace("//", "/")
    return (decoded.rstrip("/") or "/").lower()


def required_role(path: str, open_paths: frozenset[str] = OPEN_PATHS) -> str:
    """'open', 'user' or 'admin' for a request path."""
    normal = normalise_path(path)
    if normal in open_paths or normal.startswith(OPEN_PREFIXES):
        return "open"
    if normal in ADMIN_PATHS or any(normal == prefix or normal.startswith(prefix + "/") for prefix in ADMIN_PREFIXES):
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


class _FailureThrottle:
    """Invalid keys per client address: after `limit` of them within `window` seconds the address waits until
    the oldest is `window` seconds old, so a guesser gets at most `limit` tries a window."""

    _MAX_ADDRESSES = 10_000

    def __init__(self, limit: int, window: float) -> None:
        self._limit = limit
        self._window = window
        # Ordered by each address's latest failure (re-inserted on every one), so the stale ones are in front.
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str) -> int | None:
        """None when the address may present a key, else the seconds to wait."""
        failures = self._failures.get(address)
        if failures is None or len(failures) < self._limit:
            return None
        wait = failures[0] + self._window - time.monotonic()
        return max(1, math.ceil(wait)) if wait > 0 else None

    def record(self, address: str) -> None:
        now = time.monotonic()
        failures = self._failures.pop(address, deque(maxlen=self._limit))
        failures.append(now)
        self._failures[address] = failures
        while len(self._failures) > 1:  # forget addresses with no failure in the window, and the oldest past the cap
            oldest = next(iter(self._failures))
            if len(self._failures) <= self._MAX_ADDRESSES and self._failures[oldest][-1] > now - self._window:
                break
            del self._failures[oldest]


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self._app = app
        self._admin_keys = _KeyRing(settings.admin_api_key_list)
        self._user_keys = _KeyRing(settings.api_key_list)
        self._auth = bool(self._admin_keys or self._user_keys)
        self._limiter = _RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
        self._throttle = (
            _FailureThrottle(settings.auth_failure_limit, settings.auth_failure_window_seconds)
            if settings.auth_failure_limit
            else None
        )
        self._max_body = settings.max_body_bytes
        self._max_upload_mb = settings.max_upload_mb
        # The multipart envelope around an uploaded file (boundaries, field headers, the collection field) is
        # allowed on top; the file itself is held to MAX_UPLOAD_MB exactly by the documents service.
        self._max_upload_body = int(settings.max_upload_mb * 1024 * 1024) + 64 * 1024
        self._open_paths = OPEN_PATHS - {METRICS_PATH} if settings.metrics_require_key else OPEN_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            # FastAPI's routes answer only the methods they name, so HEAD would be 405 even on the health
            # probes. A HEAD is the GET without its body (RFC 9110): same status, same headers.
            scope, send = {**scope, "method": "GET"}, _without_body(send)
        path_role = required_role(scope.get("raw_path", b"").decode("latin-1") or scope["path"], self._open_paths)
        address = str((scope.get("client") or ("?",))[0])
        caller = _digest(f"client:{address}")
        role: CallerRole = "anonymous" if self._auth else "admin"  # no keys: loopback only, everyone is trusted
        if path_role != "open" and self._auth:
            wait = self._throttle.retry_after(address) if self._throttle is not None else None
            if wait is not None:
                # No key is looked at meanwhile, good ones included: otherwise the answer would tell a right
                # guess from a wrong one and the throttle would not slow guessing at all.
                await _reply(scope, receive, send, 429, "auth_throttled",
                             f"too many invalid API keys from this address; retry in {wait} s",
                             {"Retry-After": str(wait)})
                return
            key = _bearer_key(scope)
            if key is None:
                await _reply(scope, receive, send, 401, "unauthorized",
                             "send an API key as `Authorization: Bearer <key>`", {"WWW-Authenticate": "Bearer"})
                return
            caller = _digest(key)
            is_admin = self._admin_keys.contains(caller)
            if not (is_admin or self._user_keys.contains(caller)):
                if self._throttle is not None:
                    self._throttle.record(address)
                await _reply(scope, receive, send, 401, "unauthorized", "the API key is not valid",
                             {"WWW-Authenticate": "Bearer"})
                return
            if path_role == "admin" and not is_admin:
                await _reply(scope, receive, send, 403, "forbidden", "this route needs an admin API key")
                return
            role = "admin" if is_admin else "user"
        scope = {**scope, "state": {**scope.get("state", {}), ROLE_STATE_KEY: role}}
        if path_role != "open" and self._limiter is not None:
            wait = self._limiter.retry_after(caller)
            if wait is not None:
                await _reply(scope, receive, send, 429, "rate_limited", f"too many requests; retry in {wait} s",
                             {"Retry-After": str(wait)})
                return
        if scope["method"] in _BODY_METHODS:
            upload = normalise_path(scope["path"]) == UPLOAD_PATH
            body = await _read_body(receive, self._max_upload_body if upload else self._max_body)
            if body is None:
                limit = f"MAX_UPLOAD_MB={self._max_upload_mb:g}" if upload else f"MAX_BODY_BYTES={self._max_body} bytes"
                await _reply(scope, receive, send, 413, "payload_too_large",
                             f"the request body is over the limit of {limit}")
                return
            if not upload:  # an upload is multipart form data; every other body is JSON
                scope = _as_json(scope)
            receive = _replay(body, receive)
        await self._app(scope, receive, send)


def _without_body(send: Send) -> Send:
    async def send_headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_headers_only


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


async def _reply(
    scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer before the app runs, in the error envelope of the API the path belongs to."""
    await error_response(scope["path"], ErrorInfo(status, code, message), headers)(scope, receive, send)
