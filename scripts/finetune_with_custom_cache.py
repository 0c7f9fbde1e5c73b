"""Fine-tune a LoRA adapter with the base model kept in a folder of your choice (the design's fix for a model
cache in the wrong place): the command line of finetune_lora.py with --cache_dir required, e.g.

  python scripts/finetune_with_custom_cache.py --cache_dir /models --output_dir ./lora_adapters

Without --data it trains on the shipped demo data (data/demo_qa.jsonl).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.training.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(data_required=False, cache_dir_required=True))
