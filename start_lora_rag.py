"""Start the lora-rag service: questions answered from your documents by a LoRA model or Ollama.

Settings come from the environment and `.env` (copy `.env.lora` to `.env`); the options below override them.
When no vector store exists yet, it is built from the sample corpus (SAMPLE_CORPUS_PATH) first.
"""

from __future__ import annotations

import argparse
import logging

from app.checks import check_base_model, check_device, check_retrieval, run_config_checks
from app.cli import fail, settings_or_exit
from app.errors import AppError
from app.logging_config import configure_logging
from app.rag.ingestion import ingest_with_settings
from app.rag.vector_store import store_exists

logger = logging.getLogger("lora_rag")


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="address to bind (API_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (API_PORT, default 8001)")
    parser.add_argument(
        "--use-lora", type=_bool, metavar="true|false", help="start on the LoRA model (true) or Ollama (false)"
    )
    parser.add_argument("--verbose", action="store_true", default=None, help="debug logging")
    parser.add_argument(
        "--config-check",
        action="store_true",
        help="check base model, adapter, vector store, embedding model and Ollama, then exit "
        "(status 0 only if the active backend can serve)",
    )
    args = parser.parse_args(argv)
    settings = settings_or_exit(
        api_host=args.host, api_port=args.port, use_lora_default=args.use_lora, verbose=args.verbose
    )
    configure_logging(settings)

    if args.config_check:
        results, active_ok = run_config_checks(settings)
        for result in results:
            status = "OK  " if result.ok else "FAIL"
            hint = f"  -> {result.hint}" if result.hint and not result.ok else ""
            print(f"[{status}] {result.name}: {result.detail}{hint}")
        backend = "LoRA" if settings.use_lora_default else "Ollama"
        print(f"active backend ({backend}): {'can serve' if active_ok else 'cannot serve'}")
        return 0 if active_ok else 1

    # Fail before the server starts, in one line, rather than in the middle of uvicorn's start-up.
    checks = [check_retrieval(settings, load_reranker=False)]
    if settings.use_lora_default:
        checks += [check_base_model(settings), check_device(settings)]
    for check in checks:
        if not check.ok:
            fail(f"{check.name}: {check.detail} ({check.hint})")

    if not store_exists(settings.vector_store_path):
        logger.info("no vector store yet: building it from %s", settings.sample_corpus_path)
        try:
            ingest_with_settings(settings, settings.sample_corpus_path)
        except AppError as error:
            fail(error.message)

    import uvicorn

    from app.main import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="debug" if settings.verbose else settings.log_level.lower(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
