"""Read documents (.md, .txt, .html, .pdf) into plain text."""

from __future__ import annotations

from pathlib import Path

SUPPORTED_SUFFIXES = frozenset({".md", ".markdown", ".txt", ".html", ".htm", ".pdf"})
# Chinese documents written on Windows are often GB18030 rather than UTF-8.
_TEXT_ENCODINGS = ("utf-8-sig", "gb18030")


class DocumentReadError(Exception):
    """A document that cannot be read; ingestion reports it and goes on with the others."""


class TextTooLongError(Exception):
    """A document whose text runs past the character bound it was read with."""


def decode_text(data: bytes) -> str:
    for encoding in _TEXT_ENCODINGS:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace")


def read_document(path: Path, data: bytes, max_chars: int | None = None) -> str:
    """Text of a document whose bytes were already read (they are hashed by the caller); with `max_chars`,
    TextTooLongError once the text is longer (a PDF stops at the first page past it)."""
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(decode_text(data), "html.parser")
        for hidden in soup(["script", "style", "noscript"]):
            hidden.decompose()
        text = soup.get_text("\n")
    elif suffix == ".pdf":
        text = _read_pdf(data, max_chars)
    else:
        text = decode_text(data)
    _check_length(len(text), max_chars)
    return text


def _check_length(length: int, max_chars: int | None) -> None:
    if max_chars is not None and length > max_chars:
        raise TextTooLongError(f"its text is over {max_chars} characters")


def _read_pdf(data: bytes, max_chars: int | None) -> str:
    import io

    from pypdf import PdfReader

    pages: list[str] = []
    try:
        reader = PdfReader(io.BytesIO(data))
        for page in reader.pages:
            pages.append(page.extract_text() or "")
            _check_length(sum(map(len, pages)) + 2 * (len(pages) - 1), max_chars)
    except TextTooLongError:
        raise
    except Exception as error:  # pypdf raises many types for damaged, encrypted or hostile files
        raise DocumentReadError(f"not a readable PDF ({type(error).__name__}: {error})") from None
    return "\n\n".join(pages)
