"""Helpers shared by the command-line scripts: settings errors and domain errors as one clear line."""

from __future__ import annotations

import sys
from typing import NoReturn

from app.config import Settings, SettingsError, load_settings


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def settings_or_exit(**overrides: object) -> Settings:
    """Settings from the environment and `.env`, or exit with one line per invalid variable."""
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as error:
        fail(f"invalid configuration:\n{error}")
