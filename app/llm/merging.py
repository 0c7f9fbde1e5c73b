"""Fold one adapter into the base weights while every request in a batch uses it.

Unmerged, each LoRA'd Linear costs two extra small matmuls per token (measured 0.72x the merged decode speed
at batch 1 on SmolLM2-135M). Merged, the forward pass is the base model's. PEFT's own `unmerge` subtracts the
delta again, which in bfloat16 leaves rounding drift in the base weights after every switch; here the original
weight tensors are kept as they are and put back, so base answers stay exact however often adapters change.

Building a merged set costs a full-size product B·A per layer (about 55 ms for q/k/v/o of SmolLM2-135M on
2 cores), so recently used sets are kept, within MERGE_CACHE_MB, and a change back to one of them only swaps
tensor references.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MergedSet = dict[nn.Module, "torch.Tensor"]  # LoRA layer -> its base weight with the adapter folded in


def _mergeable_layers(model: nn.Module, peft_name: str) -> list[nn.Module] | None:
    """The LoRA Linear layers carrying `peft_name`, or None when one of them cannot be merged exactly:
    a base that is not a plain floating-point Linear (int8, bitsandbytes) or a LoRA variant (DoRA, bias)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    layers: list[nn.Module] = []
    for module in model.modules():
        if not isinstance(module, LoraLayer) or peft_name not in module.lora_A:
            continue
        base = module.get_base_layer()
        plain = (
            isinstance(module, LoraLinear)
            and type(base) is nn.Linear
            and base.weight.is_floating_point()
            and peft_name not in module.lora_variant
            and not module.lora_bias.get(peft_name, False)
        )
        if not plain:
            return None
        layers.append(module)
    return layers


def _set_bytes(merged: MergedSet) -> int:
    return sum(weight.numel() * weight.element_size() for weight in merged.values())


class WeightMerger:
    """Owns which adapter, if any, is folded into the base weights (engine thread only)."""

    def __init__(self, cache_bytes: int) -> None:
        self._cache_bytes = cache_bytes
        self._originals: dict[nn.Module, torch.Tensor] = {}  # while merged: each layer's original weight
        self._sets: OrderedDict[str, MergedSet] = OrderedDict()  # built merged sets, least recently used first
        self.merged: str | None = None

    def merge(self, model: nn.Module, peft_name: str) -> bool:
        """Fold `peft_name` in (restoring any other first); False when it cannot be merged exactly."""
        if self.merged == peft_name:
            return True
        self.restore()
        merged = self._sets.get(peft_name) or self._build(model, peft_name)
        if merged is None:
            return False
        for layer, weight in merged.items():
            base = layer.get_base_layer()  # type: ignore[operator]
            self._originals[layer] = base.weight.data
            base.weight.data = weight
            # PEFT's forward then calls the base layer alone.
            layer.merged_adapters.append(peft_name)  # type: ignore[union-attr]
        self.merged = peft_name
        self._sets[peft_name] = merged
        self._sets.move_to_end(peft_name)
        self._trim()
        return True

    def restore(self) -> None:
        """Put the original base weights back (exactly: the same tensors)."""
        for layer, original in self._originals.items():
            layer.get_base_layer().weight.data = original  # type: ignore[operator]
            layer.merged_adapters.clear()  # type: ignore[union-attr]
        self._originals.clear()
        self.merged = None

    def forget(self, peft_name: str) -> None:
        """Drop what was built from an adapter that is being detached."""
        if self.merged == peft_name:
            self.restore()
        self._sets.pop(peft_name, None)

    def _build(self, model: nn.Module, peft_name: str) -> MergedSet | None:
        layers = _mergeable_layers(model, peft_name)
        if not layers:
            return None
        merged: MergedSet = {}
        for layer in layers:
            original = layer.get_base_layer().weight.data  # type: ignore[operator]
            merged[layer] = original + layer.get_delta_weight(peft_name).to(original.dtype)  # type: ignore[operator]
        return merged

    def _trim(self) -> None:
        """Keep the sets not in use within the cache budget, the most recently used ones first."""
        spare = [name for name in self._sets if name != self.merged]
        total = sum(_set_bytes(self._sets[name]) for name in spare)
        for name in spare:  # least recently used first
            if total <= self._cache_bytes:
                return
            total -= _set_bytes(self._sets.pop(name))
