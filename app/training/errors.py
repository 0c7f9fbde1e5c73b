"""Errors of fine-tuning; a model that cannot be loaded is the service's own `ModelLoadError`."""

from __future__ import annotations

from app.errors import BadRequestError


class FinetuneError(BadRequestError):
    """Fine-tuning cannot start with these arguments, or cannot write its output."""

    code = "finetune_failed"


class TrainingDataError(FinetuneError):
    """The training data file is missing, empty or has unusable lines."""

    code = "invalid_training_data"
