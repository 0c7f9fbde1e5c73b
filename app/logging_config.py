"""Logging set-up: one format, UTF-8 output so Chinese text in logs stays readable."""

from __future__ import annotations

import logging
import sys

from app.config import Settings

_NOISY_LIBRARIES = ("httpx", "httpcore", "urllib3", "sentence_transformers", "transformers", "faiss")


def configure_logging(settings: Settings) -> None:
    level = logging.DEBUG if settings.verbose else getattr(logging, settings.log_level)
    if hasattr(sys.stderr, "reconfigure"):
        sys.stderr.reconfigure(encoding="utf-8", errors="backslashreplace")
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if settings.verbose else logging.WARNING)
