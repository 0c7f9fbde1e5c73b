"""lora-rag started as a user starts it: `start_lora_rag.py` in a process of its own, in a folder of its own (no
`.env` is read), configured by its environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT, closed_port, stop_process


@contextmanager
def launched_server(folder: Path, env: dict[str, str], ready_path: str = "/health/ready") -> Iterator[str]:
    """Start it on 127.0.0.1:<free port> with `env` over this process's environment; yield its URL once
    `ready_path` answers 200; stop it on exit. Its output is in `folder`/server.log."""
    folder.mkdir(parents=True, exist_ok=True)
    port = closed_port()
    environment = {**os.environ, "API_HOST": "127.0.0.1", "API_PORT": str(port), **env}
    log_path = folder / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "start_lora_rag.py")], cwd=folder,
                                   env=environment, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"lora-rag exited with {process.returncode}: {log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}{ready_path}", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lora-rag not ready in 240 s: {log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            stop_process(process)
