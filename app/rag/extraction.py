"""An upload's text, read in a child process held to a time, a memory and a length bound.

A crafted file can make a parser work far beyond its size: a 7 KB PDF whose 20 pages share one 1 MB compressed
content stream became 20 million characters (25,580 chunks, 45 s of CPU), and 6 MB of nested HTML took 48 s and
1.3 GB to parse. A thread cannot be stopped or held to a memory size; a process can. So the parent hands the bytes
to `python -m app.rag.extraction` (a fresh interpreter: nothing of the server's memory or threads), which limits its
own address space before parsing, stops a PDF at the first page past the character bound, and is killed at the
time bound. Its start costs about a tenth of a second; an upload's embedding costs far more.

Ingestion from the command line (`scripts/ingest.py`) reads the operator's own files in process, unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from app.errors import DocumentTooLargeError, UnreadableDocumentError
from app.rag.loaders import DocumentReadError, TextTooLongError, read_document

_REPO_ROOT = Path(__file__).resolve().parents[2]
#: The child's exit status for each way it can refuse, read by the parent.
_UNREADABLE, _TOO_LONG, _OUT_OF_MEMORY = 3, 4, 5


@dataclass(frozen=True)
class ExtractionLimits:
    max_chars: int  # MAX_DOCUMENT_CHARS
    seconds: float  # UPLOAD_PARSE_SECONDS
    memory_mb: int  # UPLOAD_PARSE_MB


async def read_bounded(name: str, data: bytes, limits: ExtractionLimits) -> str:
    """`read_document(name, data)` in a child process within `limits`; DocumentTooLargeError or
    UnreadableDocumentError naming the bound otherwise. Cancelling the caller kills the child."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.rag.extraction", name, str(limits.max_chars), str(limits.memory_mb),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=_REPO_ROOT,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(data), timeout=limits.seconds)
    except TimeoutError:
        raise UnreadableDocumentError(
            f"{name}: reading its text took longer than UPLOAD_PARSE_SECONDS={limits.seconds:g}; refused"
        ) from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    status, detail = process.returncode, (err.decode("utf-8", "replace").strip().splitlines() or [""])[-1]
    if status == 0:
        return out.decode("utf-8", "replace")
    if status == _UNREADABLE:
        raise UnreadableDocumentError(f"{name}: {detail}")
    if status == _TOO_LONG:
        raise DocumentTooLargeError(f"{name}: {detail}; the limit is MAX_DOCUMENT_CHARS={limits.max_chars}")
    if status == _OUT_OF_MEMORY or (status is not None and status < 0):  # a signal: the kernel's or its own
        raise DocumentTooLargeError(
            f"{name}: reading its text needs more memory than UPLOAD_PARSE_MB={limits.memory_mb}; refused"
        )
    raise UnreadableDocumentError(f"{name}: its text could not be read ({detail or status})")


def _child(name: str, max_chars: int, memory_mb: int) -> int:
    """Read stdin as the document `name`, write its text to stdout; the exit status says why not."""
    import resource

    data = sys.stdin.buffer.read()
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        text = read_document(Path(name), data, max_chars)
    except DocumentReadError as error:
        print(error, file=sys.stderr)
        return _UNREADABLE
    except TextTooLongError as error:
        print(error, file=sys.stderr)
        return _TOO_LONG
    except MemoryError:
        return _OUT_OF_MEMORY
    sys.stdout.buffer.write(text.encode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
