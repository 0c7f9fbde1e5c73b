"""A row's scores lowered for the tokens it has already generated (GenerationParams.penalties)."""

from __future__ import annotations

import torch

from app.llm.base import Penalties


def penalise(scores: torch.Tensor, generated: list[int], penalties: Penalties) -> None:
    """Apply `penalties` in place to one row's `scores` (its vocabulary's logits), from its `generated` tokens."""
    if not generated:
        return
    if penalties.presence or penalties.frequency:
        tokens, counts = torch.tensor(generated).unique(return_counts=True)
        scores[tokens] -= penalties.presence + penalties.frequency * counts.to(scores.dtype)
    if penalties.repetition != 1.0 and penalties.last_n != 0:
        window = generated if penalties.last_n < 0 else generated[-penalties.last_n :]
        tokens = torch.tensor(window).unique()
        seen = scores[tokens]
        scores[tokens] = torch.where(seen > 0, seen / penalties.repetition, seen * penalties.repetition)
