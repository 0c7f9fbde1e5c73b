"""Helpers shared by the command-line scripts and the ASGI entries (start_lora_rag.py, app/lora_main.py,
`uvicorn app.main:app`): settings errors and domain errors as one clear line, and what is done before serving."""

from __future__ import annotations

import sys
from typing import NoReturn

from app.config import Settings, SettingsError, export_to_environment, load_settings


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def settings_or_exit(*, exit_status: int = 2, **overrides: object) -> Settings:
    """Settings from the environment and `.env`, or exit (with `exit_status`) with one line per invalid
    variable."""
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as error:
        fail(f"invalid configuration:\n{error}", status=exit_status)


def prepare_to_serve(settings: Settings) -> None:
    """Check what the active backend and retrieval need, and build the vector store from the sample corpus when
    there is none; exit with one line on the first failure, before the server starts rather than in the middle of
    uvicorn's start-up."""
    from app.checks import check_base_model, check_default_backend, check_device, check_retrieval
    from app.errors import AppError
    from app.rag.ingestion import build_first_store

    checks = [check_default_backend(settings), check_retrieval(settings, load_reranker=False)]
    if settings.start_backend == "lora":
        checks += [check_base_model(settings), check_device(settings)]
    for check in checks:
        if not check.ok:
            fail(f"{check.name}: {check.detail} ({check.hint})")
    try:
        build_first_store(settings)
    except AppError as error:
        fail(error.message)


def prepared_settings(default_backend: str | None = None) -> Settings:
    """Settings for an ASGI entry (with `default_backend` over DEFAULT_BACKEND when given): read (or exit with one
    line), logging configured, `prepare_to_serve` done."""
    from app.logging_config import configure_logging

    settings = settings_or_exit(default_backend=default_backend)
    configure_logging(settings)
    prepare_to_serve(settings)
    return settings


def serve(settings: Settings) -> None:
    """Serve the app these settings make on API_HOST:API_PORT until stopped: in this process, or in WORKERS
    processes uvicorn starts (each builds `app.lora_main:app` from the settings this process exports to them)."""
    import uvicorn

    from app.main import create_app

    log_level = "debug" if settings.verbose else settings.log_level.lower()
    if settings.workers == 1:
        uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level=log_level)
        return
    export_to_environment(settings)
    uvicorn.run("app.lora_main:app", host=settings.api_host, port=settings.api_port, log_level=log_level,
                workers=settings.workers)
