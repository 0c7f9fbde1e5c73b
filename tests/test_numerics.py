"""The numeric path: the dtype and int8 choice follow what the CPU computes fast, and say why."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from app.llm.numerics.choice import CpuCapability, choose_numeric_path
from tests.conftest import REPO_ROOT

AVX2_ONLY = CpuCapability(kernel_level="AVX2", avx512_bf16=False, amx=False, vnni=False)
AVX512_NO_BF16 = CpuCapability(kernel_level="AVX512", avx512_bf16=False, amx=False, vnni=True)
SAPPHIRE_RAPIDS = CpuCapability(kernel_level="AVX512", avx512_bf16=True, amx=True, vnni=True)
NO_AVX2 = CpuCapability(kernel_level="DEFAULT", avx512_bf16=False, amx=False, vnni=False)


pytestmark = pytest.mark.numerics


def test_auto_is_bfloat16_only_where_the_cpu_has_it_natively() -> None:
    assert choose_numeric_path("auto", "cpu", False, SAPPHIRE_RAPIDS).dtype == "bfloat16"
    for cpu in (AVX2_ONLY, AVX512_NO_BF16, NO_AVX2):
        path = choose_numeric_path("auto", "cpu", False, cpu)
        assert (path.dtype, path.quantization) == ("float32", "none")
        assert "no native bfloat16" in path.reason and path.cpu == cpu.summary()


def test_an_explicit_dtype_is_kept_and_a_slow_choice_is_named() -> None:
    slow = choose_numeric_path("bfloat16", "cpu", False, AVX2_ONLY)
    assert slow.dtype == "bfloat16" and "slower" in slow.reason
    assert "slower" not in choose_numeric_path("bfloat16", "cpu", False, SAPPHIRE_RAPIDS).reason
    assert choose_numeric_path("float32", "cpu", False, SAPPHIRE_RAPIDS).dtype == "float32"


def test_int8_runs_where_its_kernels_exist_and_falls_back_saying_why() -> None:
    int8 = choose_numeric_path("auto", "cpu", True, AVX2_ONLY)
    assert (int8.dtype, int8.quantization) == ("float32", "int8-dynamic")
    fallback = choose_numeric_path("auto", "cpu", True, NO_AVX2)
    assert fallback.quantization == "none" and "need AVX2" in fallback.reason


def test_detection_follows_torchs_own_kernel_level() -> None:
    """A process whose torch is held to AVX2 kernels (ATEN_CPU_CAPABILITY) chooses as an AVX2 machine would."""
    script = (
        "import json; from app.llm.numerics.choice import CpuCapability, choose_numeric_path; "
        "c = CpuCapability.detect(); "
        "print(json.dumps([c.kernel_level, c.native_bf16, choose_numeric_path('auto', 'cpu', False, c).dtype]))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert json.loads(out.strip().splitlines()[-1]) == ["AVX2", False, "float32"]


def test_config_check_says_which_path_and_why() -> None:
    out = subprocess.run([sys.executable, "start_lora_rag.py", "--config-check"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}).stdout
    line = next(line for line in out.splitlines() if "numeric path" in line)
    assert "float32" in line and "no native bfloat16" in line and "avx2" in line

