"""Our service as a user runs it: `start_lora_rag.py` in a subprocess on a loopback port, given settings
through the environment, ready when /health/ready says so, stopped (and killed if need be) on exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import httpx

from bench.common import REPO_ROOT, process_memory_mb


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bench_env(scratch: Path, adapters_dir: Path | None = None, **variables: object) -> dict[str, str]:
    """Settings of a benchmark server: adapters from `adapters_dir`, a store built once from the docs/
    corpus under `scratch`, greedy decoding, no rate limit, Ollama pointed at a closed port. Upper-case
    keyword arguments override any of these."""
    defaults: dict[str, object] = {
        "LORA_MODEL_PATH": scratch / "no-default-adapter",
        "LORA_ADAPTERS_DIR": adapters_dir or scratch / "no-adapters",
        "VECTOR_STORE_PATH": scratch / "store",
        "SAMPLE_CORPUS_PATH": REPO_ROOT / "docs",
        "TEMPERATURE": 0,
        "RATE_LIMIT_PER_MINUTE": 0,
        "OLLAMA_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "LOG_LEVEL": "WARNING",
        # Rows are timed over a fixed number of tokens: one the repetition guard stopped early would not be.
        "REPETITION_REPEATS": 0,
    }
    return {key: str(value) for key, value in {**defaults, **variables}.items()}


class LiveServer:
    """`with LiveServer(env, workdir) as server:` -> `server.url`, `server.pid`, `server.memory()`."""

    def __init__(self, env: Mapping[str, str], workdir: Path, ready_timeout: float = 600.0) -> None:
        self._env = dict(env)
        self._workdir = workdir
        self._ready_timeout = ready_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"

    def __enter__(self) -> LiveServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self._process is not None, "the server is not running"
        return self._process.pid

    def start(self) -> None:
        from app.config import Settings

        # Only what we set reaches the server: no settings inherited from this shell, no `.env` (the working
        # folder is the scratch folder, so the repository's `.env` is not read either).
        env = {key: value for key, value in os.environ.items() if key.lower() not in Settings.model_fields}
        env.update(self._env)
        self._workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "start_lora_rag.py"), "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self._workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._ready_timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self._process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {self._ready_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def memory(self) -> dict[str, float]:
        """RSS now and peak RSS (VmHWM) of the server process, MiB."""
        return process_memory_mb(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful stop), then SIGKILL of the server's own process group after 30 s."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
