"""The design's LoRA RAG API entry (design card 003, "method 2"):

    uvicorn app.lora_main:app --host 127.0.0.1 --port 8001
    python -m app.lora_main                 # on API_HOST:API_PORT

It serves exactly what `python start_lora_rag.py` serves: settings from the environment and `.env`, the same
checks before serving, the vector store built from the sample corpus when there is none, models loaded in the
app's lifespan. `app` is made when it is first asked for (uvicorn asks once), so importing this module reads no
settings.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from app.cli import prepared_settings, serve

if TYPE_CHECKING:
    from fastapi import FastAPI


@cache
def _app() -> FastAPI:
    from app.main import create_app

    return create_app(prepared_settings())


def __getattr__(name: str) -> FastAPI:
    if name == "app":
        return _app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    serve(prepared_settings())
