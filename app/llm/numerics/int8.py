"""int8 weights on CPU that keep LoRA adapters attachable at run time.

Weight-only: each weight row is int8 with its own scale, and activations stay in bfloat16. A decoded token reads
every weight once, so halving bfloat16's bytes nearly doubles decode speed, while the answers stay those of the
float model: on SmolLM2-135M over the bench corpus, perplexity rises 0.8% (English and Chinese) where the former
dynamic int8 path (activations quantized per tensor as well, `torch.ops.quantized.linear_dynamic`) tripled it
(49.7 -> 150.8), and that path's `torch.quantize_per_channel` is deprecated (pytorch#184982).

The kernel is aten's `_weight_int8pack_mm` (vectorised for AVX2, AVX-512 and NEON; the CPU kernel torchao and
gpt-fast call for int8 weight-only). It is used directly because torchao's Int8WeightOnlyConfig dequantizes the
whole weight on every CPU call (measured here: slower than float32), and it is fast only with bfloat16 (or
float16) activations (float32 ones take a scalar path 30x slower), hence the path's bfloat16 activations.

`WeightOnlyInt8Linear` is an `nn.Linear` to PEFT (so `load_adapter` and `add_weighted_adapter` work after
quantization); its `weight` is an empty placeholder PEFT reads for device and dtype only.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class WeightOnlyInt8Linear(nn.Linear):
    """A frozen Linear whose weight is int8 per output row; activations are multiplied in their own dtype."""

    def __init__(self, linear: nn.Linear, activation_dtype: torch.dtype = torch.bfloat16) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(torch.empty(0, dtype=activation_dtype, device=linear.weight.device),
                                   requires_grad=False)
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        # Kept as plain attributes, out of the module tree, so state_dict and PEFT's load_state_dict never see them.
        self._int8_weight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self._scales = scales.to(activation_dtype)
        # torch infers Linear.bias as a Parameter from its __init__; it is None on a Linear without a bias.
        self.bias = None if linear.bias is None else nn.Parameter(  # type: ignore[assignment]
            linear.bias.detach().to(activation_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self._scales.dtype).contiguous()
        out = torch._weight_int8pack_mm(rows, self._int8_weight, self._scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only per row"


def quantize_linears_int8(model: nn.Module) -> int:
    """Replace every plain nn.Linear except LoRA's own matrices; return the count.

    The output head is included: on SmolLM2-135M it is a fifth of the weights and, left in a float dtype, half the
    bytes read per decoded token. A tied input embedding keeps its float weight for the lookup.
    """
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and "lora_" not in f"{parent_name}.{child_name}":
                setattr(parent, child_name, WeightOnlyInt8Linear(child))
                replaced += 1
    logger.info("int8 weight-only quantization applied to %d Linear layers", replaced)
    return replaced
