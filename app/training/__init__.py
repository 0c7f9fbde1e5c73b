"""LoRA fine-tuning of the base model on question/answer data, producing the adapters the service serves.

`run_finetune(FinetuneConfig(...))` is the whole run; `scripts/finetune_lora.py` is its command line.
Heavy libraries (torch, transformers, peft) are imported inside the functions that use them.
"""

from app.training.errors import FinetuneError, TrainingDataError
from app.training.finetune import FinetuneConfig, FinetuneReport, run_finetune

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneReport", "TrainingDataError", "run_finetune"]
