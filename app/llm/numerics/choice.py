"""Which numbers the model computes in: the weights' dtype and int8, decided from what the CPU really does fast.

bfloat16 halves the bytes read per token, but only a CPU with native bfloat16 instructions (AVX512-BF16 or AMX)
computes it fast. Elsewhere oneDNN emulates it: measured on SmolLM2-135M with torch held to AVX2 (bench section 8),
a 715-token prefill took 11.1 s in bfloat16 against 1.36 s in float32 and 0.71 s in int8. So `TORCH_DTYPE=auto`
picks bfloat16 only with native support and float32 otherwise. bfloat16 decode is faster there (1.0-1.2x here,
1.7x on the AMD EPYC of the engine issue), but a float32 prefill with a bfloat16 decode would keep a second copy
of the weights, with every merged adapter in both: not done; int8 is faster than either in both phases.

torch's dynamic int8 kernels (fbgemm / x86 engine) need AVX2; without it int8 falls back to float32, said so.
torch's own dispatch level (`torch.backends.cpu.get_cpu_capability()`, which `ATEN_CPU_CAPABILITY` can lower)
caps what counts as available, so a process told to use AVX2 kernels only also chooses as an AVX2 machine would.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Quantization = Literal["none", "int8-dynamic", "int8-bitsandbytes"]
_AVX512_LEVELS = ("AVX512",)
_AVX2_LEVELS = ("AVX2", *_AVX512_LEVELS)


@dataclass(frozen=True)
class CpuCapability:
    """What the CPU offers to torch, as torch reports it."""

    kernel_level: str  # torch's dispatch level: DEFAULT, AVX2, AVX512, ...
    avx512_bf16: bool
    amx: bool
    vnni: bool

    @classmethod
    def detect(cls) -> CpuCapability:
        import torch

        level = torch.backends.cpu.get_cpu_capability()
        avx512 = level.startswith(_AVX512_LEVELS)
        return cls(
            kernel_level=level,
            avx512_bf16=avx512 and torch.cpu._is_avx512_bf16_supported(),
            amx=avx512 and torch.cpu._is_amx_tile_supported(),
            vnni=level.startswith(_AVX2_LEVELS) and torch.cpu._is_vnni_supported(),
        )

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx

    @property
    def int8_kernels(self) -> bool:
        """fbgemm's dynamic int8 linear needs AVX2; ARM has qnnpack, which the default engine picks."""
        return _is_arm() or self.kernel_level.startswith(_AVX2_LEVELS)

    def summary(self) -> str:
        extras = [name for name, present in (("avx512_bf16", self.avx512_bf16), ("amx", self.amx),
                                             ("vnni", self.vnni)) if present]
        return " ".join([self.kernel_level.lower(), *extras])


@dataclass(frozen=True)
class NumericPath:
    """The dtype and quantization the model runs in, and why (for /model_info and --config-check)."""

    dtype: str
    quantization: Quantization
    reason: str
    cpu: str | None  # the CPU's capability summary; None on CUDA

    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]


def choose_numeric_path(
    requested_dtype: str, device: str, quantize: bool, capability: CpuCapability | None = None,
    enable_fp16: bool = False,
) -> NumericPath:
    """TORCH_DTYPE (auto|float32|bfloat16|float16), ENABLE_QUANTIZATION and ENABLE_FP16 on `device`, made
    concrete. ENABLE_FP16 is float16 on CUDA; on a CPU, where float16 is emulated, it does not apply and the
    reason says so."""
    if device == "cuda":
        path = _cuda_path("float16" if enable_fp16 else requested_dtype, quantize)
        return replace(path, reason=f"ENABLE_FP16: {path.reason}") if enable_fp16 else path
    path = _cpu_path(requested_dtype, quantize, capability or CpuCapability.detect())
    if enable_fp16:
        path = replace(path, reason=f"{path.reason}; ENABLE_FP16 applies on CUDA only (a CPU emulates float16): "
                                    "not used")
    return path


def _cpu_path(requested_dtype: str, quantize: bool, cpu: CpuCapability) -> NumericPath:
    summary = cpu.summary()
    if quantize:
        if cpu.int8_kernels:
            # The dynamic int8 kernel takes float32 activations; whatever is not int8 stays float32.
            return NumericPath("float32", "int8-dynamic", "ENABLE_QUANTIZATION: int8 weights, float32 activations",
                               summary)
        fallback = _cpu_dtype(requested_dtype, cpu)
        return NumericPath(fallback.dtype, "none",
                           f"ENABLE_QUANTIZATION ignored: int8 kernels need AVX2 (this CPU: {summary}); "
                           f"{fallback.reason}", summary)
    return _cpu_dtype(requested_dtype, cpu)


def _cpu_dtype(requested: str, cpu: CpuCapability) -> NumericPath:
    summary = cpu.summary()
    if requested != "auto":
        note = "" if requested != "bfloat16" or cpu.native_bf16 else (
            "; this CPU has no native bfloat16, so prefill is several times slower than float32"
        )
        return NumericPath(requested, "none", f"TORCH_DTYPE={requested}{note}", summary)
    if cpu.native_bf16:
        return NumericPath("bfloat16", "none", "auto: the CPU computes bfloat16 natively (AVX512-BF16/AMX)", summary)
    return NumericPath("float32", "none",
                       "auto: no native bfloat16 on this CPU (emulated bfloat16 prefill is several times slower)",
                       summary)


def _cuda_path(requested: str, quantize: bool) -> NumericPath:
    import torch

    if requested == "auto":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        reason = f"auto: {dtype} on this GPU"
    else:
        dtype, reason = requested, f"TORCH_DTYPE={requested}"
    if quantize:
        return NumericPath(dtype, "int8-bitsandbytes", f"{reason}; ENABLE_QUANTIZATION: bitsandbytes int8", None)
    return NumericPath(dtype, "none", reason, None)


def _is_arm() -> bool:
    import platform

    return platform.machine().lower() in {"arm64", "aarch64"}
