"""What a caller may see of the server's own details: admins (and everyone when no keys are configured) see
them whole; other callers see each absolute file path cut to its part below the working directory, or else to its
last name. Where the server keeps its files is the operator's business, and error texts name paths too. The
caller's role is what app/api/security.py left in the request's state.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.requests import Request

ROLE_STATE_KEY = "role"

_ABSOLUTE_PATH = re.compile(
    # Starts a word (not inside a URL, a relative path or a ratio like 1/2) and stops before spaces, quotes,
    # separators and a sentence's closing dot.
    r"(?<![\w.:/~-])~?/[^\s'\"`,;:()\[\]{}<>]*[^\s'\"`,;:()\[\]{}<>.]"
)


def _shorten_path(match: re.Match[str]) -> str:
    path = Path(match.group())
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return path.name


def _hide_paths(value: Any) -> Any:
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(_shorten_path, value)
    if isinstance(value, dict):
        return {key: _hide_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_hide_paths(item) for item in value]
    return value


def shown_to(request: Request, report: dict[str, Any]) -> dict[str, Any]:
    """`report` as this caller may see it. Admins (and everyone when no keys are configured) see it whole;
    other callers see each absolute file path cut to its part below the working directory, or else to its
    last name: where the server keeps its files is the operator's business, and error texts name paths too."""
    admin = request.scope.get("state", {}).get(ROLE_STATE_KEY) == "admin"
    return report if admin else {key: _hide_paths(value) for key, value in report.items()}
