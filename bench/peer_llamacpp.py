"""llama.cpp (llama-cpp-python) decoding the same SmolLM2-135M weights: the GGUF file our embedded base model
is converted from. A benchmark-only dependency: `bash bench/setup_peer.sh` installs it into .venv."""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT

INSTALL_COMMAND = "bash bench/setup_peer.sh"


def installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "?"))


@contextlib.contextmanager
def _without_extra_buffer_types() -> Iterator[None]:
    """Load a model with `use_extra_bufts=False` (llama-cpp-python's `Llama` has no argument for it)."""
    import llama_cpp.llama_cpp as low_level

    original = low_level.llama_model_default_params

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = defaults
    try:
        yield
    finally:
        low_level.llama_model_default_params = original


class LlamaCppPeer:
    """One llama.cpp context on the GGUF file, greedy decoding on `threads` threads."""

    def __init__(self, gguf: Path, threads: int, extra_buffers: bool = True) -> None:
        from llama_cpp import Llama

        with contextlib.nullcontext() if extra_buffers else _without_extra_buffer_types():
            self._llm: Any = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                                   seed=0, verbose=False)

    def decode_rate(self, prompt: str, tokens: int) -> tuple[float, int]:
        """Tokens/s over prompt evaluation plus `tokens` greedy steps (the way ours is timed); the count."""
        ids = self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        self._llm.reset()  # no prompt reuse from the last call: prefill is timed on both sides
        count = 0
        started = time.perf_counter()
        for _ in self._llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            count += 1
            if count >= tokens:
                break
        return count / (time.perf_counter() - started), count


def extra_buffers_work(gguf: Path, threads: int) -> bool:
    """Whether llama.cpp's extra buffer types (AMX tiles, repacked weights) run here. A CPU can list AMX while
    its hypervisor does not enable it, and then llama.cpp dies of SIGILL: so try in a child process first."""
    code = ("import sys; from pathlib import Path; from bench.peer_llamacpp import LlamaCppPeer; "
            f"LlamaCppPeer(Path(sys.argv[1]), {threads}).decode_rate('Hello, ' * 32, 2)")  # a prompt: matrix products
    try:
        child = subprocess.run([sys.executable, "-c", code, str(gguf)], cwd=REPO_ROOT, capture_output=True,
                               timeout=300)
    except subprocess.TimeoutExpired:
        return False
    return child.returncode == 0
