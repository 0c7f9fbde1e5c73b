"""Run a batch whose rows all use one adapter (or none) at the plain model's speed.

Unmerged, each LoRA'd Linear costs two extra small matmuls per token, and even a merged or disabled PEFT layer
costs a Python wrapper call per Linear per token (measured: served path 0.85x a plain model at batch 1 on
SmolLM2-135M). So for such a batch every PEFT layer is swapped out of the module tree for its base Linear, whose
weight has the adapter folded in where the adapter has that layer. Mixed batches and any PEFT operation (load,
unload, building a mix) first put the PEFT layers back with their original weights.

PEFT's own `unmerge` subtracts the delta again, which in bfloat16 leaves rounding drift in the base weights after
every switch; here the original weight tensors are never written, so base answers stay exact however often
adapters change. Building a merged set costs a full-size product B·A per layer (about 55 ms for q/k/v/o of
SmolLM2-135M on 2 cores), so recently used sets are kept, within MERGE_CACHE_MB, and a change back to one of
them only swaps tensor references.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Slot:
    """Where a PEFT LoRA layer sits in the module tree."""

    parent: nn.Module
    attribute: str
    layer: nn.Module  # the PEFT wrapper
    base: nn.Module  # the Linear (or int8 Linear) it wraps


MergedSet = dict[nn.Module, "torch.Tensor"]  # PEFT layer -> its base weight with the adapter folded in


def _slots(model: nn.Module) -> list[_Slot]:
    from peft.tuners.lora.layer import LoraLayer

    slots = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            parent_name, _, attribute = name.rpartition(".")
            slots.append(_Slot(model.get_submodule(parent_name), attribute, module, module.get_base_layer()))
    return slots


def _can_merge(slot: _Slot, peft_name: str) -> bool:
    """Exactly foldable: a plain floating-point Linear base (not int8, not bitsandbytes), vanilla LoRA (no DoRA,
    no LoRA bias)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layer = slot.layer
    return (
        isinstance(layer, LoraLinear)
        and type(slot.base) is nn.Linear
        and slot.base.weight.is_floating_point()
        and peft_name not in layer.lora_variant
        and not layer.lora_bias.get(peft_name, False)
    )


def _set_bytes(merged: MergedSet) -> int:
    return sum(weight.numel() * weight.element_size() for weight in merged.values())


class WeightMerger:
    """Owns whether the PEFT layers are in the model and which adapter is folded in (engine thread only)."""

    def __init__(self, cache_bytes: int) -> None:
        self._cache_bytes = cache_bytes
        self._layout: list[_Slot] | None = None  # found once per model change
        self._originals: dict[nn.Module, torch.Tensor] = {}  # PEFT layer -> its base weight as loaded
        self._sets: OrderedDict[str, MergedSet] = OrderedDict()  # built merged sets, least recently used first
        self._unwrapped = False
        self.merged: str | None = None

    def run_plain(self, model: nn.Module, peft_name: str | None) -> bool:
        """Take the PEFT layers out, with `peft_name` folded into the weights (None: the base model).
        False, and nothing changed, when that adapter cannot be folded in exactly."""
        if self._unwrapped and self.merged == peft_name:
            return True
        self.restore()
        slots = self._slots(model)
        merged: MergedSet = {}
        if peft_name is not None:
            carrying = [slot for slot in slots if peft_name in slot.layer.lora_A]  # type: ignore[operator]
            if not carrying or not all(_can_merge(slot, peft_name) for slot in carrying):
                return False
            merged = self._sets.get(peft_name) or self._build(carrying, peft_name)
            self._sets[peft_name] = merged
            self._sets.move_to_end(peft_name)
        for slot in slots:
            if slot.layer in merged:
                slot.base.weight.data = merged[slot.layer]
            setattr(slot.parent, slot.attribute, slot.base)
        self._unwrapped, self.merged = True, peft_name
        self._trim()
        return True

    def restore(self) -> None:
        """Put the PEFT layers back, their base weights the original tensors."""
        if not self._unwrapped:
            return
        for slot in self._layout or []:
            slot.base.weight.data = self._originals[slot.layer]
            setattr(slot.parent, slot.attribute, slot.layer)
        self._unwrapped, self.merged = False, None

    def model_changing(self, detached: str | None = None) -> None:
        """Before PEFT changes the model (attach, detach, build a mix): restore, and forget what goes away."""
        self.restore()
        self._layout = None
        if detached is not None:
            self._sets.pop(detached, None)

    def _slots(self, model: nn.Module) -> list[_Slot]:
        if self._layout is None:
            self._layout = _slots(model)
            self._originals = {slot.layer: slot.base.weight.data for slot in self._layout}
        return self._layout

    def _build(self, carrying: list[_Slot], peft_name: str) -> MergedSet:
        merged: MergedSet = {}
        for slot in carrying:
            original = self._originals[slot.layer]
            merged[slot.layer] = original + slot.layer.get_delta_weight(peft_name).to(original.dtype)  # type: ignore[operator]
        return merged

    def _trim(self) -> None:
        """Keep the sets not in use within the cache budget, the most recently used ones first."""
        spare = [name for name in self._sets if name != self.merged]
        total = sum(_set_bytes(self._sets[name]) for name in spare)
        for name in spare:  # least recently used first
            if total <= self._cache_bytes:
                return
            total -= _set_bytes(self._sets.pop(name))
