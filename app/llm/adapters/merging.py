"""Run batches without PEFT's per-layer overhead, by swapping what sits in the module tree.

Unmerged, each LoRA'd Linear costs two extra small matmuls per token, and even a merged or disabled PEFT layer
costs a Python wrapper call per Linear per token (measured: served path 0.85x a plain model at batch 1 on
SmolLM2-135M). So for a batch whose rows all use one adapter (or none) every PEFT layer is swapped out for its
base Linear, whose weight has the adapter folded in where the adapter has that layer. For a batch with
different adapters each PEFT layer is swapped for one that adds every row's delta in two batched matmuls.
Any PEFT operation (load, unload, building a mix) first puts the PEFT layers back with their original weights.

PEFT's own `unmerge` subtracts the delta again, which in bfloat16 leaves rounding drift in the base weights after
every switch; here the original weight tensors are never written, so base answers stay exact however often
adapters change. Building a merged set costs a full-size product B·A per layer (about 55 ms for q/k/v/o of
SmolLM2-135M on 2 cores), so recently used sets are kept, within MERGE_CACHE_MB, and a change back to one of
them only swaps tensor references.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

from torch import nn

if TYPE_CHECKING:
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer


@dataclass(frozen=True)
class _Slot:
    """Where a PEFT LoRA layer sits in the module tree."""

    parent: nn.Module
    attribute: str
    layer: LoraLayer  # the PEFT wrapper (a Module too)
    base: nn.Module  # the Linear (or int8 Linear) it wraps


MergedSet = dict["LoraLayer", "torch.Tensor"]  # PEFT layer -> its base weight with the adapter folded in


def _weight(module: nn.Module) -> torch.Tensor:
    """`module.weight`: torch types any attribute of a Module as `Tensor | Module`, but every layer here (the
    base layers, PEFT's lora_A and lora_B Linears) holds its weight as a tensor."""
    return cast("torch.Tensor", module.weight)


def _slots(model: nn.Module) -> list[_Slot]:
    from peft.tuners.lora.layer import LoraLayer

    slots = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            parent_name, _, attribute = name.rpartition(".")
            slots.append(_Slot(model.get_submodule(parent_name), attribute, module, module.get_base_layer()))
    return slots


def _can_merge(slot: _Slot, peft_name: str) -> bool:
    """Exactly foldable: vanilla LoRA on a plain floating-point Linear (not int8, not bitsandbytes)."""
    return _plain_lora(slot, peft_name) and type(slot.base) is nn.Linear and slot.base.weight.is_floating_point()


def _plain_lora(slot: _Slot, peft_name: str) -> bool:
    """Vanilla LoRA on a Linear (no DoRA, no LoRA bias): its delta is exactly B·A·scaling."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layer = slot.layer
    return (
        isinstance(layer, LoraLinear)
        and peft_name not in layer.lora_variant
        and not layer.lora_bias.get(peft_name, False)
    )


class _RowLora(nn.Module):
    """The base layer plus each batch row's own LoRA delta in two batched matmuls. PEFT's mixed batch instead
    loops over the adapters in every layer (gather, cast, two matmuls, scatter per adapter): with 4 adapters in a
    batch of 8 that halved the decode speed of a batch on one adapter."""

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.down = down  # (rows, in, rank): each row's A transposed, zero-padded to the batch's largest rank
        self.up = up  # (rows, rank, out): each row's B transposed times its scaling; zeros for base rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        result = self.base(x)
        delta = torch.bmm(torch.bmm(x.to(self.down.dtype), self.down), self.up)
        return result + delta.to(result.dtype)  # type: ignore[no-any-return]


def _row_lora(slot: _Slot, row_adapters: list[str | None]) -> nn.Module:
    """`slot`'s base layer with the batch rows' adapters stacked, or the bare base layer when none has it."""
    import torch

    layer = slot.layer
    present = {name for name in row_adapters if name is not None and name in layer.lora_A}
    if not present:
        return slot.base
    in_features, out_features = layer.in_features, layer.out_features
    assert in_features is not None and out_features is not None  # PEFT knows both for a Linear
    first = _weight(layer.lora_A[next(iter(present))])
    rank = max(_weight(layer.lora_A[name]).shape[0] for name in present)
    down = torch.zeros(len(row_adapters), in_features, rank, dtype=first.dtype)
    up = torch.zeros(len(row_adapters), rank, out_features, dtype=first.dtype)
    for row, name in enumerate(row_adapters):
        if name in present:
            a, b = _weight(layer.lora_A[name]), _weight(layer.lora_B[name])
            down[row, :, : a.shape[0]] = a.T
            up[row, : a.shape[0], :] = b.T * layer.scaling[name]
    return _RowLora(slot.base, down.to(first.device), up.to(first.device))


def _set_bytes(merged: MergedSet) -> int:
    return sum(weight.numel() * weight.element_size() for weight in merged.values())


class WeightMerger:
    """Owns whether the PEFT layers are in the model and which adapter is folded in (engine thread only)."""

    def __init__(self, cache_bytes: int) -> None:
        self._cache_bytes = cache_bytes
        self._layout: list[_Slot] | None = None  # found once per model change
        self._originals: dict[LoraLayer, torch.Tensor] = {}  # PEFT layer -> its base weight as loaded
        self._sets: OrderedDict[str, MergedSet] = OrderedDict()  # built merged sets, least recently used first
        self._mode: Literal["peft", "plain", "rows"] = "peft"  # what sits in the module tree now
        self.merged: str | None = None
        self._row_adapters: list[str | None] = []  # each row's adapter while the mode is "rows"

    def run_plain(self, model: nn.Module, peft_name: str | None) -> bool:
        """Take the PEFT layers out, with `peft_name` folded into the weights (None: the base model).
        False, and nothing changed, when that adapter cannot be folded in exactly."""
        if self._mode == "plain" and self.merged == peft_name:
            return True
        self.restore()
        slots = self._slots(model)
        merged: MergedSet = {}
        if peft_name is not None:
            carrying = [slot for slot in slots if peft_name in slot.layer.lora_A]
            if not carrying or not all(_can_merge(slot, peft_name) for slot in carrying):
                return False
            merged = self._sets.get(peft_name) or self._build(carrying, peft_name)
            self._sets[peft_name] = merged
            self._sets.move_to_end(peft_name)
        for slot in slots:
            if slot.layer in merged:
                slot.base.weight.data = merged[slot.layer]
            setattr(slot.parent, slot.attribute, slot.base)
        self._mode, self.merged = "plain", peft_name
        self._trim()
        return True

    def run_rows(self, model: nn.Module, row_adapters: list[str | None]) -> bool:
        """Take the PEFT layers out for a batch with different adapters per row (None: the base model), each
        LoRA layer replaced by one that adds every row's own delta. False, and nothing changed, when an
        adapter is not plain LoRA (PEFT's own mixed batch then runs)."""
        if self._mode == "rows" and self._row_adapters == row_adapters:
            return True  # the same rows as the last step's: the stacked deltas are in place
        self.restore()
        slots = self._slots(model)
        names = {name for name in row_adapters if name is not None}
        if not all(_plain_lora(slot, name) for slot in slots for name in names if name in slot.layer.lora_A):
            return False
        for slot in slots:
            setattr(slot.parent, slot.attribute, _row_lora(slot, row_adapters))
        self._mode, self._row_adapters = "rows", list(row_adapters)
        return True

    def restore(self) -> None:
        """Put the PEFT layers back, their base weights the original tensors."""
        if self._mode == "peft":
            return
        for slot in self._layout or []:
            slot.base.weight.data = self._originals[slot.layer]
            setattr(slot.parent, slot.attribute, slot.layer)
        self._mode, self.merged = "peft", None

    def model_changing(self, detached: str | None = None) -> None:
        """Before PEFT changes the model (attach, detach, build a mix): restore, and forget what goes away."""
        self.restore()
        self._layout = None
        if detached is not None:
            self._sets.pop(detached, None)

    def _slots(self, model: nn.Module) -> list[_Slot]:
        if self._layout is None:
            self._layout = _slots(model)
            self._originals = {slot.layer: _weight(slot.base).data for slot in self._layout}
        return self._layout

    def _build(self, carrying: list[_Slot], peft_name: str) -> MergedSet:
        merged: MergedSet = {}
        for slot in carrying:
            original = self._originals[slot.layer]
            layer = cast("LoraLinear", slot.layer)  # _can_merge let through only plain LoRA on a Linear
            merged[slot.layer] = original + layer.get_delta_weight(peft_name).to(original.dtype)
        return merged

    def _trim(self) -> None:
        """Keep the sets not in use within the cache budget, the most recently used ones first."""
        spare = [name for name in self._sets if name != self.merged]
        total = sum(_set_bytes(self._sets[name]) for name in spare)
        for name in spare:  # least recently used first
            if total <= self._cache_bytes:
                return
            total -= _set_bytes(self._sets.pop(name))
