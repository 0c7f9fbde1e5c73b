"""A real HTTP server speaking the Ollama REST API (docs/api.md of ollama/ollama), for wire-level tests.

Usage::

    with OllamaWireServer(models=["qwen3:4b"], embedding_dim=8) as server:
        client = ollama.Client(host=server.base_url)
        client.chat(model="qwen3:4b", messages=[{"role": "user", "content": "hi"}])
        assert server.bodies("/api/chat")[0]["model"] == "qwen3:4b"
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

Reply = Callable[[str, list[dict[str, Any]]], str]

GENERATION_PATHS: frozenset[str] = frozenset({"/api/chat", "/api/generate"})
GARBAGE_BODY: bytes = b"<html><body>502 Bad Gateway</body></html>\nthis is {not json"
_SNIPPET_CHARS = 60


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it; `body` is the parsed JSON, or None when absent/invalid."""

    method: str
    path: str
    body: Any
    raw_body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def default_reply(model: str, messages: list[dict[str, Any]]) -> str:
    """Deterministic answer naming the model and quoting the start of the last user message."""
    last_user = next(
        (str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), ""
    )
    snippet = " ".join(last_user.split())[:_SNIPPET_CHARS]
    return f'Model {model} answers: you asked "{snippet}".'


def split_tokens(text: str) -> list[str]:
    """Split text into whitespace-preserving pieces ("a b " -> ["a", " b "]); "".join() gives text back."""
    pieces = re.findall(r"\s*\S+", text)
    if not pieces:
        return [text] if text else []
    tail = text[sum(len(p) for p in pieces) :]
    pieces[-1] += tail
    return pieces


def embed_text(text: str, dim: int) -> list[float]:
    """Deterministic L2-normalised hashed bag of character trigrams and words; similar texts -> similar vectors."""
    vec = [0.0] * dim
    norm_text = " ".join(text.lower().split())
    padded = f"  {norm_text}  "
    features = [padded[i : i + 3] for i in range(len(padded) - 2)] + norm_text.split()
    for feat in features:
        digest = hashlib.blake2b(feat.encode("utf-8"), digest_size=8).digest()
        bucket = int.from_bytes(digest[:4], "little") % dim
        # A signed hash keeps unrelated texts near-orthogonal instead of all sharing a positive bias.
        vec[bucket] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec))
    return [v / norm for v in vec] if norm > 0 else vec


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _model_details(name: str) -> dict[str, Any]:
    base, _, tag = name.partition(":")
    family = base.rsplit("/", 1)[-1]
    size_match = re.search(r"(\d+(?:\.\d+)?)b", tag.lower())
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": f"{size_match.group(1)}B" if size_match else "7B",
        "quantization_level": "Q4_K_M",
    }


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    """The peer closed the connection while we were writing."""


class OllamaWireServer:
    """Ollama-compatible HTTP server on 127.0.0.1:<random port>, run in a background thread.

    Behaviour knobs (`reply`, `token_delay`, `fail_with`, `garbage`, `fail_mid_stream`, `models`)
    are plain attributes read on every request, so a test may change them while the server runs.
    """

    def __init__(
        self,
        models: Iterable[str] = ("qwen3:4b",),
        *,
        embedding_dim: int = 8,
        reply: Reply | None = None,
        token_delay: float = 0.0,
        fail_with: tuple[int, str] | None = None,
        garbage: bool = False,
        fail_mid_stream: tuple[int, str] | None = None,
        fail_paths: Iterable[str] = GENERATION_PATHS,
        context_length: int = 4096,
        version: str = "0.6.3",
    ) -> None:
        if embedding_dim < 1:
            raise ValueError("embedding_dim must be >= 1")
        self.models: list[str] = list(models)
        self.embedding_dim = embedding_dim
        self.reply: Reply = reply or default_reply
        self.token_delay = token_delay
        self.fail_with = fail_with
        self.garbage = garbage
        # (after_n_tokens, message): stream N tokens, then an in-band {"error": message} line, as Ollama
        # does when the runner dies mid-generation; with stream=false it becomes a 500.
        self.fail_mid_stream = fail_mid_stream
        self.fail_paths: frozenset[str] = frozenset(fail_paths)
        self.context_length = context_length
        self.version = version

        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._aborted_streams = 0
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> OllamaWireServer:
        """Bind 127.0.0.1:0 and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="ollama-wire-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open keep-alive/streaming connections and release the port. Idempotent."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with self._lock:
            conns = list(self._connections)
        # Idle keep-alive handler threads would otherwise sit in readline() until the client hangs up.
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> OllamaWireServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- introspection -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def bodies(self, path: str) -> list[Any]:
        """Parsed JSON bodies of the requests sent to `path`."""
        return [r.body for r in self.requests if r.path == path]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def aborted_streams(self) -> int:
        """How many streamed responses were cut short because the client went away."""
        with self._lock:
            return self._aborted_streams

    # -- internals used by the handler ---------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _note_aborted(self) -> None:
        with self._lock:
            self._aborted_streams += 1

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _has_model(self, name: str) -> bool:
        # Ollama treats a bare name as "<name>:latest".
        return name in self.models or (":" not in name and f"{name}:latest" in self.models)

    def _pause(self) -> None:
        if self.token_delay > 0:
            self._stopping.wait(self.token_delay)


def _make_handler(server: OllamaWireServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_OllamaHandler):
        owner = server

    return Handler


class _OllamaHandler(BaseHTTPRequestHandler):
    owner: OllamaWireServer
    # HTTP/1.1 so streams use chunked transfer encoding and connections are kept alive, like Ollama's Go server.
    protocol_version = "HTTP/1.1"
    server_version = "ollama-wire-server"
    sys_version = ""
    timeout = 30

    def setup(self) -> None:
        super().setup()
        self.owner._track(self.connection, add=True)

    def finish(self) -> None:
        self.owner._track(self.connection, add=False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (_ClientGone, ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- plumbing ------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGone() from exc

    def _send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Date", self.date_time_string())
        self.end_headers()
        if self.command != "HEAD":
            self._write(body)

    def _send_json(self, status: int, payload: Any) -> None:
        self._send_bytes(status, json.dumps(payload).encode("utf-8"), "application/json; charset=utf-8")

    def _send_error_json(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def _not_found(self) -> None:
        self._send_bytes(404, b"404 page not found", "text/plain")

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Date", self.date_time_string())
        self.end_headers()

    def _stream_line(self, payload: Any) -> None:
        data = json.dumps(payload).encode("utf-8") + b"\n"
        self._write(f"{len(data):x}\r\n".encode("ascii") + data + b"\r\n")

    def _end_stream(self) -> None:
        self._write(b"0\r\n\r\n")

    # -- routing -------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        raw = self._read_body()
        body: Any = None
        parse_error: str | None = None
        if raw:
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                parse_error = f"invalid character in request body: {exc}"
        self.owner._record(
            RecordedRequest(method=method, path=path, body=body, raw_body=raw, headers=dict(self.headers.items()))
        )

        routes: dict[tuple[str, str], Callable[[Any], None]] = {
            ("GET", "/"): self._root,
            ("HEAD", "/"): self._root,
            ("GET", "/api/version"): self._version,
            ("HEAD", "/api/version"): self._version,
            ("GET", "/api/tags"): self._tags,
            ("HEAD", "/api/tags"): self._tags,
            ("GET", "/api/ps"): self._ps,
            ("POST", "/api/show"): self._show,
            ("POST", "/api/chat"): self._chat,
            ("POST", "/api/generate"): self._generate,
            ("POST", "/api/embed"): self._embed,
            ("POST", "/api/embeddings"): self._embeddings,
        }
        handler = routes.get((method, path))
        if handler is None:
            # Gin (Ollama's router) answers unknown paths and wrong methods alike with a plain-text 404.
            self._not_found()
            return
        try:
            if method == "POST":
                if parse_error is not None:
                    raise _BadRequest(400, parse_error)
                if body is None:
                    raise _BadRequest(400, "missing request body")
                if not isinstance(body, dict):
                    raise _BadRequest(400, "json: cannot unmarshal request body into an object")
                if path in self.owner.fail_paths:
                    if self.owner.fail_with is not None:
                        status, message = self.owner.fail_with
                        raise _BadRequest(status, message)
                    if self.owner.garbage:
                        self._send_bytes(200, GARBAGE_BODY, "application/json; charset=utf-8")
                        return
            handler(body)
        except _BadRequest as exc:
            self._send_error_json(exc.status, exc.message)

    def _require_model(self, body: dict[str, Any]) -> str:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise _BadRequest(400, "model is required")
        if not self.owner._has_model(name):
            raise _BadRequest(404, f'model "{name}" not found, try pulling it first')
        return name

    # -- endpoints -----------------------------------------------------------------------------

    def _root(self, _body: Any) -> None:
        self._send_bytes(200, b"Ollama is running", "text/plain; charset=utf-8")

    def _version(self, _body: Any) -> None:
        self._send_json(200, {"version": self.owner.version})

    def _model_entry(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-01-01T00:00:00.000000Z",
            "size": 1_000_000_000 + len(name) * 1_000_003,
            "digest": hashlib.sha256(name.encode("utf-8")).hexdigest(),
            "details": _model_details(name),
        }

    def _tags(self, _body: Any) -> None:
        self._send_json(200, {"models": [self._model_entry(n) for n in self.owner.models]})

    def _ps(self, _body: Any) -> None:
        models = []
        for name in self.owner.models:
            entry = self._model_entry(name)
            entry.pop("modified_at")
            entry.update(
                {
                    "expires_at": "2099-01-01T00:00:00.000000Z",
                    "size_vram": entry["size"],
                    "context_length": self.owner.context_length,
                }
            )
            models.append(entry)
        self._send_json(200, {"models": models})

    def _show(self, body: dict[str, Any]) -> None:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise _BadRequest(400, "model is required")
        if not self.owner._has_model(name):
            # Ollama's /api/show words this one differently from the generation endpoints.
            raise _BadRequest(404, f"model '{name}' not found")
        details = _model_details(name)
        family = details["family"]
        self._send_json(
            200,
            {
                "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {name}\n",
                "parameters": f"num_ctx                        {self.owner.context_length}",
                "template": "{{ .System }}\n{{ .Prompt }}",
                "details": details,
                "model_info": {
                    "general.architecture": family,
                    "general.parameter_count": 4_000_000_000,
                    f"{family}.context_length": self.owner.context_length,
                    f"{family}.embedding_length": self.owner.embedding_dim,
                },
                "capabilities": ["completion", "embedding"],
                "modified_at": "2025-01-01T00:00:00.000000Z",
            },
        )

    def _embed(self, body: dict[str, Any]) -> None:
        started = time.perf_counter_ns()
        model = self._require_model(body)
        raw_input = body.get("input")
        if raw_input is None or isinstance(raw_input, str):
            # Ollama embeds nothing for an empty string rather than erroring.
            texts = [raw_input] if raw_input else []
        elif isinstance(raw_input, list) and all(isinstance(t, str) for t in raw_input):
            texts = list(raw_input)
        else:
            raise _BadRequest(400, "invalid input type")
        dim = self.owner.embedding_dim
        dimensions = body.get("dimensions")
        if isinstance(dimensions, int) and not isinstance(dimensions, bool) and dimensions > 0:
            dim = min(dim, dimensions)
        embeddings = [embed_text(t, dim) for t in texts]
        load_ns = 1_000_000
        self._send_json(
            200,
            {
                "model": model,
                "embeddings": embeddings,
                "total_duration": load_ns + max(time.perf_counter_ns() - started, 1),
                "load_duration": load_ns,
                "prompt_eval_count": sum(len(split_tokens(t)) for t in texts),
            },
        )

    def _embeddings(self, body: dict[str, Any]) -> None:
        self._require_model(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise _BadRequest(400, "json: cannot unmarshal prompt into string")
        self._send_json(200, {"embedding": embed_text(prompt, self.owner.embedding_dim) if prompt else []})

    def _chat(self, body: dict[str, Any]) -> None:
        model = self._require_model(body)
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise _BadRequest(400, "json: cannot unmarshal messages into []api.Message")
        if not messages:
            # Empty messages is Ollama's "load the model" request.
            self._send_json(
                200,
                {
                    "model": model,
                    "created_at": _now_rfc3339(),
                    "message": {"role": "assistant", "content": ""},
                    "done_reason": "load",
                    "done": True,
                },
            )
            return
        self._generate_common(body, model, messages, lambda piece: {"message": {"role": "assistant", "content": piece}})

    def _generate(self, body: dict[str, Any]) -> None:
        model = self._require_model(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise _BadRequest(400, "json: cannot unmarshal prompt into string")
        if not prompt:
            self._send_json(
                200,
                {"model": model, "created_at": _now_rfc3339(), "response": "", "done": True, "done_reason": "load"},
            )
            return
        messages: list[dict[str, Any]] = []
        if isinstance(body.get("system"), str) and body["system"]:
            messages.append({"role": "system", "content": body["system"]})
        messages.append({"role": "user", "content": prompt})
        self._generate_common(body, model, messages, lambda piece: {"response": piece})

    def _generate_common(
        self,
        body: dict[str, Any],
        model: str,
        messages: list[dict[str, Any]],
        wrap: Callable[[str], dict[str, Any]],
    ) -> None:
        started = time.perf_counter_ns()
        try:
            text = self.owner.reply(model, messages)
        except Exception as exc:  # noqa: BLE001 - a failing reply callable becomes a 500, like a runner crash
            raise _BadRequest(500, f"reply callable failed: {exc}") from exc
        pieces = split_tokens(text)
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        num_predict = options.get("num_predict")
        done_reason = "stop"
        # Negative num_predict means "no limit" in Ollama (-1 infinite, -2 fill context).
        if isinstance(num_predict, int) and not isinstance(num_predict, bool) and 0 <= num_predict < len(pieces):
            pieces = pieces[:num_predict]
            done_reason = "length"
        prompt_tokens = sum(len(split_tokens(str(m.get("content") or ""))) for m in messages)
        stream = body.get("stream", True) is not False
        fail_mid = self.owner.fail_mid_stream

        def final_stats(eval_ns: int) -> dict[str, Any]:
            load_ns = 1_000_000
            prompt_ns = 50_000 * max(prompt_tokens, 1)
            eval_ns = max(eval_ns, 1_000 * max(len(pieces), 1))
            return {
                "done": True,
                "done_reason": done_reason,
                "total_duration": load_ns + prompt_ns + eval_ns,
                "load_duration": load_ns,
                "prompt_eval_count": prompt_tokens,
                "prompt_eval_duration": prompt_ns,
                "eval_count": len(pieces),
                "eval_duration": eval_ns,
            }

        if not stream:
            for _ in pieces:
                self.owner._pause()
            if fail_mid is not None:
                raise _BadRequest(500, fail_mid[1])
            payload = {"model": model, "created_at": _now_rfc3339(), **wrap("".join(pieces))}
            payload.update(final_stats(time.perf_counter_ns() - started))
            self._send_json(200, payload)
            return

        # Like Gin's c.Stream, headers only go out with the first chunk, so a slow first token delays them too.
        headers_sent = False
        try:
            for index, piece in enumerate(pieces):
                self.owner._pause()
                if self.owner._stopping.is_set():
                    raise _ClientGone()
                if not headers_sent:
                    self._start_stream()
                    headers_sent = True
                if fail_mid is not None and index >= fail_mid[0]:
                    self._stream_line({"error": fail_mid[1]})
                    self._end_stream()
                    return
                self._stream_line({"model": model, "created_at": _now_rfc3339(), **wrap(piece), "done": False})
            if not headers_sent:
                self._start_stream()
            if fail_mid is not None:
                self._stream_line({"error": fail_mid[1]})
                self._end_stream()
                return
            final = {"model": model, "created_at": _now_rfc3339(), **wrap("")}
            final.update(final_stats(time.perf_counter_ns() - started))
            self._stream_line(final)
            self._end_stream()
        except _ClientGone:
            self.owner._note_aborted()
            self.close_connection = True

