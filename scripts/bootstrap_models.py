"""Prepare the models once: convert the configured base model if it is the embedded GGUF default,
and check the embedding model resolves offline. Later starts reuse the converted folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.cli import fail, settings_or_exit  # noqa: E402
from app.errors import AppError  # noqa: E402
from app.llm.model_source import resolve_base_model, resolve_embedding_model  # noqa: E402
from app.logging_config import configure_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache_dir", type=Path, help="where to put the converted model (default: CACHE_DIR)")
    args = parser.parse_args(argv)
    settings = settings_or_exit(cache_dir=args.cache_dir)
    configure_logging(settings)
    try:
        base = resolve_base_model(settings.base_model_name, settings.cache_dir)
        embedding = (
            settings.embedding_model
            if settings.ollama_embedding_model
            else resolve_embedding_model(settings.embedding_model)
        )
    except AppError as error:
        fail(error.message)
    print(f"base model: {base}\nembedding model: {embedding}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
