"""Where and in which precision training runs.

Measured on a 2-core AMD EPYC (Zen 4, avx512_bf16) with SmolLM2-135M, batch 8 x 126 tokens, LoRA on the
attention projections, forward + backward: float32 weights about 210 tokens/s; the frozen base in bfloat16
with float32 LoRA matrices about 320 tokens/s; float32 weights under bfloat16 autocast (the Trainer's
`bf16=True`) 4-5x slower than plain float32. So on CPU the frozen weights are stored in bfloat16 where
the CPU computes it natively (it is also the dtype the service serves in) and autocast is never used; on
CUDA the weights stay float32 under the Trainer's bf16 (or fp16) autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from app.llm.numerics.choice import CpuCapability
from app.training.errors import FinetuneError

if TYPE_CHECKING:
    import torch

DeviceChoice = Literal["cpu", "cuda", "auto"]
#: The frozen weights' dtype on CPU: auto (bfloat16 where the CPU computes it natively), or one of them always
#: (float32 gives the same numbers on every CPU kind, at about two thirds of the speed where bfloat16 is native).
WeightsDtypeChoice = Literal["auto", "float32", "bfloat16"]


@dataclass(frozen=True)
class TrainingDevice:
    name: Literal["cpu", "cuda"]
    weights_dtype: Literal["float32", "bfloat16"]
    autocast: Literal["bf16", "fp16"] | None

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return torch.bfloat16 if self.weights_dtype == "bfloat16" else torch.float32

    def use_activation_checkpointing(self, model: torch.nn.Module) -> bool:
        """On CUDA, where memory is short, when the model supports it; on CPU memory is ample and the
        recomputation would only cost time."""
        return self.name == "cuda" and bool(getattr(model, "supports_gradient_checkpointing", False))


def resolve_training_device(requested: DeviceChoice, weights_dtype: WeightsDtypeChoice = "auto") -> TrainingDevice:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("--device cuda, but no CUDA device is available here: use --device cpu or auto")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        autocast: Literal["bf16", "fp16"] = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return TrainingDevice("cuda", "float32", autocast)
    if weights_dtype != "auto":
        return TrainingDevice("cpu", weights_dtype, None)
    # AVX512-BF16 or AMX, as torch may use them (ATEN_CPU_CAPABILITY can hold it lower): without them bfloat16
    # matmuls are emulated and slower than float32. The same test as the service's TORCH_DTYPE=auto.
    native = CpuCapability.detect().native_bf16
    return TrainingDevice("cpu", "bfloat16" if native else "float32", None)
