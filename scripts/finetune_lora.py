"""Fine-tune a LoRA adapter (or, with --task classification, a text classifier): `--help` explains every option.
The command line itself is app/training/cli.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.training.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
