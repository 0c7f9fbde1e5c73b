"""Start the lora-rag service: questions answered from your documents by a LoRA model or Ollama.

Settings come from the environment and `.env` (copy `.env.lora` to `.env`); the options below override them.
When no vector store exists yet, it is built from the sample corpus (SAMPLE_CORPUS_PATH) first.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from app.checks import run_config_checks
from app.cli import prepare_to_serve, serve, settings_or_exit
from app.llm.adapters.manager import ADAPTER_NAME_PATTERN
from app.llm.engine.jobs import BASE_KEY
from app.logging_config import configure_logging

logger = logging.getLogger("lora_rag")


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _adapter(item: str) -> tuple[str, Path]:
    """`name=path`, or a bare path named after its folder (lmdeploy's `--adapters`)."""
    name, separator, path_text = item.partition("=")
    if not separator:
        path_text = item
    path = Path(path_text.strip())
    if not path_text.strip() or not path.is_dir():
        raise argparse.ArgumentTypeError(f"{item!r}: {path_text!r} is not a folder")
    if "," in path_text:  # LORA_ADAPTERS, which these entries join, separates its entries with commas
        raise argparse.ArgumentTypeError(f"{item!r}: an adapter path may not contain a comma")
    name = name.strip() if separator else path.resolve().name
    if not ADAPTER_NAME_PATTERN.match(name) or name == BASE_KEY:
        raise argparse.ArgumentTypeError(
            f"{item!r}: adapter name {name!r} is invalid: use letters, digits, '-' and '_' (max 64), not {BASE_KEY}"
        )
    return name, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="address to bind (API_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (API_PORT, default 8001)")
    parser.add_argument(
        "--use-lora", type=_bool, metavar="true|false", help="start on the LoRA model (true) or Ollama (false)"
    )
    parser.add_argument(
        "--adapters",
        nargs="+",
        type=_adapter,
        metavar="[NAME=]PATH",
        help="LoRA adapters to serve by name, e.g. --adapters sql=/path/a code=/path/b; a bare path is named after "
        "its folder. Added to LORA_ADAPTERS; on a name clash the flag wins",
    )
    parser.add_argument("--verbose", action="store_true", default=None, help="debug logging")
    parser.add_argument(
        "--workers", type=int, metavar="N", help="worker processes serving together (WORKERS, default 1), as uvicorn's "
        "--workers: each loads its own model; run-time changes of what is served are then refused (409)",
    )
    parser.add_argument(
        "--config-check",
        action="store_true",
        help="check base model, adapter, vector store, embedding model and Ollama, then exit "
        "(status 0 only if the active backend can serve)",
    )
    args = parser.parse_args(argv)
    overrides = {
        "api_host": args.host, "api_port": args.port, "use_lora_default": args.use_lora, "verbose": args.verbose,
        "workers": args.workers,
        # The flag says which backend to start on, over DEFAULT_BACKEND from the environment.
        "default_backend": None if args.use_lora is None else ("lora" if args.use_lora else "ollama"),
    }
    # --config-check's failures exit 1, invalid values included; a server that cannot start exits 2.
    exit_status = 1 if args.config_check else 2
    settings = settings_or_exit(exit_status=exit_status, **overrides)
    if args.adapters:  # read again: the flag's entries join LORA_ADAPTERS, known once the settings are read
        adapters = {**settings.named_adapters, **dict(args.adapters)}
        listed = ",".join(f"{name}={path}" for name, path in adapters.items())
        settings = settings_or_exit(exit_status=exit_status, **overrides, lora_adapters=listed)
    configure_logging(settings)

    if args.config_check:
        results, active_ok = run_config_checks(settings)
        for result in results:
            status = "OK  " if result.ok else "FAIL"
            hint = f"  -> {result.hint}" if result.hint and not result.ok else ""
            print(f"[{status}] {result.name}: {result.detail}{hint}")
        print(f"active backend ({settings.start_backend}): {'can serve' if active_ok else 'cannot serve'}")
        return 0 if active_ok else 1

    prepare_to_serve(settings)
    serve(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
