"""What every benchmark section shares: the run context, random adapters, statistics, the machine, table rows."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
ADAPTER_NAMES = ("a", "b", "c", "d")
MESSAGES = [{"role": "user", "content": "Explain in two sentences what a vector store is."}]


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    section: str
    measure: str
    value: str
    target: str = ""
    verdict: str = ""  # "met", "NOT met" or "" (no target)
    note: str = ""


@dataclass
class SectionResult:
    number: int
    title: str
    data: dict[str, Any]
    rows: list[Row]
    seconds: float = 0.0


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


@dataclass
class Context:
    """Shared by the sections of one run: sizes, a scratch folder, lazily built adapters, a live server."""

    quick: bool
    scratch: Path
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _base: str | None = None
    _adapters: dict[str, Path] | None = None
    _shared: dict[str, Any] = field(default_factory=dict)

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    @property
    def base_model(self) -> str:
        """The converted embedded SmolLM2 folder (converted once, then reused)."""
        if self._base is None:
            from app.config import EMBEDDED_BASE_MODEL
            from app.llm.model_source import resolve_base_model

            self._base = resolve_base_model(EMBEDDED_BASE_MODEL, None)
        return self._base

    def adapters(self) -> dict[str, Path]:
        """Four random LoRA adapters a..d, one folder each under scratch/adapters."""
        if self._adapters is None:
            self._adapters = random_adapters(self.base_model, self.scratch / "adapters", ADAPTER_NAMES)
        return self._adapters

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """One object (a live server, say) for every section that asks for `key`; `make` registers its
        clean-up on `stack`, which the run closes at its end."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def backend_settings(self, **update: Any) -> Any:
        """Settings for an in-process HFLoraBackend that knows adapters a..d and nothing from `.env`."""
        from app.config import Settings

        folder = self.scratch / "none"
        named = ",".join(f"{name}={path}" for name, path in self.adapters().items())
        # repetition_repeats=0: rows are timed over a fixed number of tokens, which the guard could cut short.
        values: dict[str, Any] = {"lora_model_path": folder, "lora_adapters_dir": folder, "lora_adapters": named,
                                  "repetition_repeats": 0}
        return Settings(_env_file=None, **{**values, **update})  # type: ignore[call-arg]


def random_adapters(base: str, folder: Path, names: Sequence[str], seed: int = 1) -> dict[str, Path]:
    """Save one LoRA adapter (r=16 on the attention projections, random B) per name; the base model is
    loaded once. Random adapters cost exactly what trained ones cost to serve."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    paths = {}
    for offset, name in enumerate(names):
        generator = torch.Generator().manual_seed(seed + offset)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
        paths[name] = folder / name
        model.save_pretrained(paths[name])
    return paths


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p95, p99, mean, min, max of a list of measurements (empty dict when there are none)."""
    if not values:
        return {}
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def process_memory_mb(pid: int) -> dict[str, float]:
    """Resident set size now (VmRSS) and at its peak (VmHWM) of a Linux process, in MiB."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return {"rss_mb": values.get("VmRSS", 0.0), "peak_rss_mb": values.get("VmHWM", 0.0)}


def memory_read_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Memory read bandwidth as torch sees it (sum over a buffer far larger than the caches), best of
    `repeats`: the ceiling of a decode step that must stream every weight once."""
    import torch

    buffer = torch.ones(megabytes * 1024 * 1024 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best / 1e9


def machine() -> dict[str, Any]:
    """What the figures were measured on; the load average says how busy the machine was."""
    import torch

    from app.llm.numerics.choice import CpuCapability, auto_candidates

    capability = CpuCapability.detect()
    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    memory_kb = next((int(line.split()[1]) for line in _lines("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {
        "cpu": cpu,
        "cpu_capability": capability.summary(),
        "auto_candidates": list(auto_candidates(capability)),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readlines()
    except OSError:
        return []


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| # | measure | value | target | verdict | note |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row.section, row.measure, row.value, row.target, row.verdict, row.note]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def as_json(result: SectionResult) -> dict[str, Any]:
    return {"title": result.title, "seconds": round(result.seconds, 1), "data": result.data,
            "rows": [asdict(row) for row in result.rows]}
