"""Fine-tune a LoRA adapter, as the design documents run it:

  python finetune_lora.py --model_name Qwen/Qwen2.5-1.5B-Instruct --cache_dir /models \\
      --output_dir ./lora_adapters --num_train_epochs 3

Without --data it trains on the shipped demo data (data/demo_qa.jsonl) and says so. The same command line as
scripts/finetune_lora.py (app/training/cli.py): `--help` explains every option.
"""

from __future__ import annotations

from app.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main(data_required=False))
