"""Build or update the FAISS vector store from a folder of documents (.md, .txt, .html, .pdf).

Unchanged files are skipped (by content hash), removed files are dropped, and the new store version
is switched in atomically. Settings come from the environment and `.env` (see `.env.lora`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.cli import fail, settings_or_exit  # noqa: E402
from app.errors import AppError  # noqa: E402
from app.logging_config import configure_logging  # noqa: E402
from app.rag.collections import DEFAULT_COLLECTION  # noqa: E402
from app.rag.ingestion import ingest_with_settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="folder of documents (default: SAMPLE_CORPUS_PATH, ./docs)")
    parser.add_argument(
        "--store", type=Path, help="vector store folder, with VECTOR_STORE_BACKEND=faiss (default: VECTOR_STORE_PATH)"
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="start the store afresh from this folder only (re-embeds every file)"
    )
    parser.add_argument(
        "--collection", default=DEFAULT_COLLECTION,
        help="the collection (a separate document set, chosen by `collection` on /ask) to ingest into; created "
        f"by its first ingestion (default: {DEFAULT_COLLECTION})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    settings = settings_or_exit(vector_store_path=args.store)
    configure_logging(settings)
    source = args.source or settings.sample_corpus_path
    try:
        report = ingest_with_settings(
            settings, source, rebuild=args.rebuild, show_progress=not args.quiet, collection=args.collection
        )
    except AppError as error:
        fail(error.message)
    version = f" {report.version}" if report.version else ""
    print(
        f"collection {args.collection}, vector store{version} at {report.location}: {report.chunk_count} chunks "
        f"({len(report.added)} files added, {len(report.updated)} updated, {len(report.unchanged)} unchanged, "
        f"{len(report.removed)} removed; {report.chunks_embedded} chunks embedded in {report.seconds:.1f}s)"
    )
    if report.other_sources:
        print(
            f"the store also holds documents from {', '.join(sorted(report.other_sources))} "
            "(ingested from other folders or uploaded; kept, and with `--rebuild` embedded again)"
        )
    for name, reason in report.failed.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
