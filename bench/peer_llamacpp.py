"""llama.cpp (llama-cpp-python) decoding the same SmolLM2-135M weights: the GGUF file our embedded base model
is converted from. A benchmark-only dependency: `bash bench/setup_peer.sh` installs it into .venv."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

INSTALL_COMMAND = "bash bench/setup_peer.sh"


def installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "?"))


class LlamaCppPeer:
    """One llama.cpp context on the GGUF file, greedy decoding on `threads` threads."""

    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

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
