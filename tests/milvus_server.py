"""Milvus Lite run as a server on loopback (`milvus-lite server`), reached as a Milvus cluster is: over gRPC at
http://host:port, by several processes at once."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import closed_port, stop_process


@contextmanager
def milvus_lite_server(data_dir: Path) -> Iterator[str]:
    """Serve the Milvus Lite folder `data_dir` on 127.0.0.1:<free port>; yield its URI; stop it on exit."""
    port = closed_port()
    log = (data_dir.parent / f"{data_dir.name}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {process.returncode}: see {log.name}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("milvus-lite server did not listen within 60 s") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)
        log.close()
