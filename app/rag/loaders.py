"""Read documents (.md, .txt, .html, .pdf) into plain text."""

from __future__ import annotations

from pathlib import Path

SUPPORTED_SUFFIXES = frozenset({".md", ".markdown", ".txt", ".html", ".htm", ".pdf"})
# Chinese documents written on Windows are often GB18030 rather than UTF-8.
_TEXT_ENCODINGS = ("utf-8-sig", "gb18030")


class DocumentReadError(Exception):
    """A document that cannot be read; ingestion reports it and goes on with the others."""


def decode_text(data: bytes) -> str:
    for encoding in _TEXT_ENCODINGS:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace")


def read_document(path: Path, data: bytes) -> str:
    """Text of a document whose bytes were already read (they are hashed by the caller)."""
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(decode_text(data), "html.parser")
        for hidden in soup(["script", "style", "noscript"]):
            hidden.decompose()
        return soup.get_text("\n")
    if suffix == ".pdf":
        return _read_pdf(path, data)
    return decode_text(data)


def _read_pdf(path: Path, data: bytes) -> str:
    import io

    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except Exception as error:  # pypdf raises many types for damaged, encrypted or hostile files
        raise DocumentReadError(f"not a readable PDF ({type(error).__name__}: {error})") from None
