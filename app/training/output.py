"""The output folder, written whole or not at all.

Everything goes to a hidden staging folder beside `output_dir` (same filesystem, so the final move is a
rename) and replaces `output_dir` only once complete; a failed or interrupted run leaves it untouched.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

from app.llm.adapters.inspect import ADAPTER_CONFIG_FILE
from app.training.errors import FinetuneError

REPORT_FILE = "training_report.json"


def check_output_dir(output_dir: Path) -> None:
    """Refuse, before any work, an output_dir that must not be replaced."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FinetuneError(f"--output_dir {output_dir} is an existing file, not a folder: choose a folder path")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        # Replacing a folder deletes it: only a previous adapter may go, never e.g. a mistyped home folder.
        if not ((output_dir / ADAPTER_CONFIG_FILE).is_file() or (output_dir / REPORT_FILE).is_file()):
            raise FinetuneError(
                f"--output_dir {output_dir} is a folder with other content (no {ADAPTER_CONFIG_FILE}); "
                "it would be replaced: choose an empty or new folder"
            )
    if output_dir.parent.exists() and not output_dir.parent.is_dir():
        raise FinetuneError(f"--output_dir {output_dir}: {output_dir.parent} is a file, not a folder")


class StagedOutput:
    """A staging folder that becomes `target` on `commit()`, or disappears on `discard()`."""

    def __init__(self, target: Path) -> None:
        check_output_dir(target)
        self.target = target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        except OSError as error:
            raise FinetuneError(f"cannot write next to --output_dir {target}: {error.strerror}") from None

    def commit(self) -> None:
        """Move the staged folder into place, replacing an earlier output only now."""
        try:
            if not self.target.exists():
                self.staging.rename(self.target)
                return
            check_output_dir(self.target)
            previous = self.target.with_name(f".{self.target.name}.previous-{uuid.uuid4().hex[:8]}")
            self.target.rename(previous)
            try:
                self.staging.rename(self.target)
            except OSError:
                previous.rename(self.target)
                raise
        except OSError as error:
            raise FinetuneError(f"cannot move the adapter into --output_dir {self.target}: {error.strerror}") from None
        shutil.rmtree(previous, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
