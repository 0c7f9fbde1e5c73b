"""A sampled row's next token: temperature, then Ollama's (llama.cpp's, vLLM's) `top_k` and `min_p`, then `top_p`."""

from __future__ import annotations

import torch

from app.llm.base import GenerationParams


def sample(scores: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    """One token from a row's scores at `params.temperature`, among the `top_k` most likely (0: all), those at least
    `min_p` times as likely as the most likely one, and the smallest set of them reaching `top_p` (the most likely
    one is always kept); drawn from the row's own generator when it has a seed, so the same request gives the same
    answer again whatever rows it shares a step with."""
    scaled = scores / max(params.temperature, 1e-5)
    # Stable: among equal scores (frequent in bfloat16) the lowest id comes first, as greedy's argmax takes it.
    sorted_scores, order = scaled.sort(descending=True, stable=True)
    if params.top_k:
        sorted_scores, order = sorted_scores[: params.top_k], order[: params.top_k]
    probabilities = sorted_scores.softmax(dim=-1)
    keep = (probabilities.cumsum(dim=-1) - probabilities) < params.top_p
    if params.min_p:
        keep &= probabilities >= params.min_p * probabilities[0]
    kept = probabilities * keep
    pick = torch.multinomial(kept / kept.sum(), 1, generator=generator)
    return int(order[pick])
