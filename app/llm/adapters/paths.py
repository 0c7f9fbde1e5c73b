"""The one containment check every run-time adapter load goes through, before anything is read."""

from __future__ import annotations

import re
from pathlib import Path

from app.errors import AdapterError
from app.llm.adapters.inspect import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

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
    try:
        roots = [root.resolve() for root in [adapters_root, *allowed_roots]]
        resolved = (candidate if candidate.is_absolute() else adapters_root / candidate).resolve()
        if not _inside(resolved, roots):
            raise AdapterError("the adapter path is outside the allowed adapter folders (ADAPTER_ALLOWED_ROOTS)")
        if not resolved.is_dir():
            raise AdapterError(f"no adapter folder '{text}' under the allowed adapter folders")
        # The folder being inside is not enough: a file in it may be a link to anywhere.
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
            if not _inside((resolved / name).resolve(), roots):
                raise AdapterError(f"{name} in the adapter folder links outside the allowed adapter folders")
    except OSError as error:  # a name over 255 bytes, a folder that cannot be read
        raise AdapterError(f"the adapter path cannot be used: {error.strerror or error}") from None
    except RuntimeError as error:  # Python 3.11's Path.resolve on a symlink loop
        raise AdapterError(f"the adapter path cannot be used: {error}") from None
    return resolved


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)
