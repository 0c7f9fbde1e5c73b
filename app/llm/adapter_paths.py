"""The one containment check every run-time adapter load goes through, before anything is read."""

from __future__ import annotations

import re
from pathlib import Path

from app.errors import AdapterError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def resolve_adapter_path(requested: str, adapters_root: Path, allowed_roots: list[Path]) -> Path:
    """Where an adapter named or addressed by a request lives, or AdapterError (400).

    A name or relative path is taken under the adapters root; an absolute path must lie inside an
    allowed root. URLs, `..`, and paths (symlinks included) that resolve outside the roots are refused.
    The answer is the resolved real path, so a symlink swapped in later cannot redirect the load.
    """
    text = requested.strip()
    if not text or "\x00" in text:
        raise AdapterError("the adapter path is empty or invalid")
    if _URL.match(text) and not Path(text).exists():
        raise AdapterError("adapter paths must be local folders; URLs are refused")
    candidate = Path(text)
    if ".." in candidate.parts:
        raise AdapterError("adapter paths may not contain '..'")
    roots = [root.resolve() for root in [adapters_root, *allowed_roots]]
    resolved = (candidate if candidate.is_absolute() else adapters_root / candidate).resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise AdapterError("the adapter path is outside the allowed adapter folders (ADAPTER_ALLOWED_ROOTS)")
    if not resolved.is_dir():
        raise AdapterError(f"no adapter folder '{text}' under the allowed adapter folders")
    return resolved
