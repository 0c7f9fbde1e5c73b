"""LoRA fine-tuning of the base model: on question/answer data for the adapters the service serves, or on
labelled texts for classifiers (a LoRA adapter plus a Linear head).

`run_finetune(FinetuneConfig(...))` and `run_classifier_training(ClassifierConfig(...))` are whole runs;
`scripts/finetune_lora.py` is their command line (`--task generation | classification`).
Heavy libraries (torch, transformers, peft) are imported inside the functions that use them.
"""

from app.training.classification import ClassifierConfig, ClassifierReport, run_classifier_training
from app.training.errors import FinetuneError, TrainingDataError
from app.training.finetune import FinetuneConfig, FinetuneReport, run_finetune

__all__ = [
    "ClassifierConfig",
    "ClassifierReport",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneReport",
    "TrainingDataError",
    "run_classifier_training",
    "run_finetune",
]
