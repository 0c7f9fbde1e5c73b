"""Which numbers the model computes in, chosen by name (NUMERIC_PATH) or, with `auto`, by the measured cost of a
typical answer on this CPU.

The paths on a CPU: `float32`; `bfloat16` (fast only where the CPU has it natively: AVX512-BF16 or AMX; elsewhere
oneDNN emulates it and a prefill is several times slower than float32); `int8`: weight-only int8 with bfloat16
activations (numerics/int8.py). `auto` compares the candidates on what a RAG answer costs: its prompt's prefill
(compute-bound) plus its decoded tokens (memory-bound: int8 reads half of bfloat16's bytes per token), measured
on the served model's own layer shapes (numerics/calibration.py). Every candidate has passed the quality gate:
on SmolLM2-135M over the bench corpus, perplexity within 2% of bfloat16's (int8: +0.8%); bfloat16 is a candidate
only where it is native. A candidate within 5% of the fastest that keeps more precision is preferred, so close
measurements do not flip the choice from start to start.

The prefill and decode could run on different paths (a bfloat16 prefill, an int8 decode), but that keeps two
copies of the weights: not done (docs/performance.md, section 8, has the figures).

torch's own dispatch level (`torch.backends.cpu.get_cpu_capability()`, which `ATEN_CPU_CAPABILITY` can lower)
caps what counts as available, so a process told to use AVX2 kernels only also chooses as an AVX2 machine would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from app.llm.numerics.calibration import PathCost, TypicalAnswer, measure_for_model, typical_answer

if TYPE_CHECKING:
    import torch

    from app.config import Settings

Quantization = Literal["none", "int8-weight-only", "int8-bitsandbytes"]
_AVX512_LEVELS = ("AVX512",)
_AVX2_LEVELS = ("AVX2", *_AVX512_LEVELS)
_PREFER_PRECISION_WITHIN = 0.05  # a more precise candidate this close to the fastest is chosen instead


@dataclass(frozen=True)
class PathSpec:
    """A numeric path by name: the dtype the model loads and computes in, and how its Linear weights are stored."""

    dtype: str
    quantization: Quantization


# The CPU's paths, most precise first (the order `auto` prefers among near-equal costs).
CPU_PATHS: dict[str, PathSpec] = {
    "float32": PathSpec("float32", "none"),
    "bfloat16": PathSpec("bfloat16", "none"),
    "float16": PathSpec("float16", "none"),
    "int8": PathSpec("bfloat16", "int8-weight-only"),
}
NUMERIC_PATH_NAMES = ("auto", *CPU_PATHS)


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

    def summary(self) -> str:
        extras = [name for name, present in (("avx512_bf16", self.avx512_bf16), ("amx", self.amx),
                                             ("vnni", self.vnni)) if present]
        return " ".join([self.kernel_level.lower(), *extras])


@dataclass(frozen=True)
class NumericPath:
    """The path the model runs in, and why (for /model_info and --config-check)."""

    name: str
    dtype: str
    quantization: Quantization
    reason: str
    cpu: str | None  # the CPU's capability summary; None on CUDA
    typical: TypicalAnswer | None = None  # what `auto` measured, when it did
    costs: tuple[PathCost, ...] = ()

    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    def describe(self) -> dict[str, object]:
        """/model_info's `numeric_path`: the name, why, the CPU, and what `auto` measured when it did."""
        facts: dict[str, object] = {"name": self.name, "reason": self.reason, "cpu": self.cpu}
        if self.typical is not None:
            typical = self.typical
            facts["typical_answer"] = {"prompt_tokens": typical.prompt_tokens, "answer_tokens": typical.answer_tokens}
            facts["measured"] = [{"path": cost.path, "prefill_seconds": round(cost.prefill_seconds, 3),
                                  "decode_tokens_per_second": round(1 / cost.decode_seconds_per_token, 1),
                                  "answer_seconds": round(cost.answer_seconds(typical), 3)} for cost in self.costs]
        return facts


MeasureCosts = Callable[[tuple[str, ...], TypicalAnswer], tuple[PathCost, ...]]


def choose_served_path(settings: Settings, device: str, source: str) -> NumericPath:
    """The path the model at `source` (from_pretrained's folder or hub id) runs in with these settings."""
    cache_dir = str(settings.cache_dir) if settings.cache_dir else None
    return choose_numeric_path(
        settings.numeric_path_request, device, measure_for_model(source, cache_dir, settings.prefill_chunk_tokens),
        typical_answer(settings.retrieval_top_k, settings.chunk_size, settings.max_new_tokens),
        enable_fp16=settings.enable_fp16,
    )


def choose_numeric_path(request: tuple[str, str], device: str, measure: MeasureCosts, typical: TypicalAnswer, *,
                        capability: CpuCapability | None = None, enable_fp16: bool = False) -> NumericPath:
    """`request` (Settings.numeric_path_request: auto or a path's name, and the setting that asked) made concrete
    on `device`. `measure` gives each candidate's cost of `typical` on this machine; only `auto` on a CPU calls
    it. ENABLE_FP16 is float16 on CUDA; on a CPU, where float16 is emulated, it does not apply and the reason
    says so."""
    requested, asked_by = request
    if device == "cuda":
        path = _cuda_path("float16" if enable_fp16 else requested, asked_by)
        return replace(path, reason=f"ENABLE_FP16: {path.reason}") if enable_fp16 else path
    cpu = capability or CpuCapability.detect()
    path = _cpu_path(requested, asked_by, cpu) if requested != "auto" else _cheapest(cpu, measure, typical)
    if enable_fp16:
        path = replace(path, reason=f"{path.reason}; ENABLE_FP16 applies on CUDA only (a CPU emulates float16): "
                                    "not used")
    return path


def auto_candidates(cpu: CpuCapability) -> tuple[str, ...]:
    """The paths `auto` measures on this CPU, most precise first."""
    return tuple(name for name in ("float32", "bfloat16", "int8") if name != "bfloat16" or cpu.native_bf16)


def _cheapest(cpu: CpuCapability, measure: MeasureCosts, typical: TypicalAnswer) -> NumericPath:
    costs = measure(auto_candidates(cpu), typical)
    fastest = min(cost.answer_seconds(typical) for cost in costs)
    chosen = next(cost for cost in costs if cost.answer_seconds(typical) <= fastest * (1 + _PREFER_PRECISION_WITHIN))
    figures = ", ".join(f"{cost.path} {cost.answer_seconds(typical):.2f} s" for cost in costs)
    native = "" if cpu.native_bf16 else "; bfloat16 not tried: this CPU emulates it"
    reason = (f"auto: {chosen.path} answers fastest here (a {typical.prompt_tokens}-token prompt and a "
              f"{typical.answer_tokens}-token answer, measured on this model's layers: {figures}{native})")
    spec = CPU_PATHS[chosen.path]
    return NumericPath(chosen.path, spec.dtype, spec.quantization, reason, cpu.summary(), typical, costs)


def _cpu_path(requested: str, asked_by: str, cpu: CpuCapability) -> NumericPath:
    spec = CPU_PATHS[requested]
    note = ""
    if spec.dtype == "bfloat16" and not cpu.native_bf16:
        note = ("; this CPU has no native bfloat16, so a prefill is several times slower than float32"
                if spec.quantization == "none" else "; this CPU emulates its bfloat16 activations")
    return NumericPath(requested, spec.dtype, spec.quantization, f"{asked_by}{note}", cpu.summary())


def _cuda_path(requested: str, asked_by: str) -> NumericPath:
    import torch

    float_dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if requested == "int8":
        return NumericPath("int8", float_dtype, "int8-bitsandbytes", f"{asked_by}: bitsandbytes int8", None)
    if requested == "auto":
        return NumericPath(float_dtype, float_dtype, "none", f"auto: {float_dtype} on this GPU", None)
    return NumericPath(requested, requested, "none", asked_by, None)
