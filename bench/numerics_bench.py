"""Section 8: the numeric path. Prefill and decode of the bare model in each dtype, on this CPU and on it held to
AVX2 kernels (an AVX2-only machine, such as the AMD EPYC of the engine issue), with what TORCH_DTYPE=auto picks.

Each CPU level runs in a child process, because torch and oneDNN fix their kernel level when they start:
`ATEN_CPU_CAPABILITY=avx2` for torch's own kernels and `ONEDNN_MAX_CPU_ISA=AVX2` for oneDNN's matmuls.

    python bench/numerics_bench.py --child [--prompt 715] [--tokens 32]   # one level: JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO_ROOT, Context, Row, SectionResult, verdict  # noqa: E402

AVX2_LIMIT = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
DTYPES = ("bfloat16", "float32", "int8")


def numeric_paths(context: Context) -> SectionResult:
    prompt, tokens = context.size(715, 64), context.size(32, 4)
    levels = {"this CPU": {}, "held to AVX2": AVX2_LIMIT}
    data: dict[str, Any] = {}
    rows = []
    for label, limit in levels.items():
        command = [sys.executable, str(Path(__file__)), "--child", "--prompt", str(prompt), "--tokens", str(tokens)]
        result = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **limit}, capture_output=True, text=True,
                                check=True, timeout=1800)
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        data[label] = measured
        floats = {dtype: measured["runs"][dtype] for dtype in ("bfloat16", "float32")}
        fastest_prefill = min(floats, key=lambda dtype: floats[dtype]["prefill_ms"])
        auto = measured["auto"]
        runs = ", ".join(f"{dtype} {run['prefill_ms']:.0f} ms / {run['decode_tok_s']:.1f} tok/s"
                         for dtype, run in measured["runs"].items())
        rows.append(Row("8", f"prefill {prompt} tok / decode, {label} ({measured['cpu']})", runs,
                        "auto = the float dtype with the fastest prefill", verdict(auto == fastest_prefill),
                        f"auto picks {auto}"))
        split = floats["bfloat16"]["decode_tok_s"] / floats["float32"]["decode_tok_s"]
        rows.append(Row("8", f"split path (float32 prefill, bfloat16 decode), {label}",
                        f"decode {split:.2f}x float32's", "", "",
                        "would keep a second copy of the weights; kept only if it wins clearly"))
    return SectionResult(8, "numeric paths", data, rows)


def _child(prompt: int, tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from app.config import EMBEDDED_BASE_MODEL
    from app.llm.model_source import resolve_base_model
    from app.llm.numerics.choice import CpuCapability, choose_numeric_path
    from app.llm.numerics.int8 import quantize_linears_int8

    source = resolve_base_model(EMBEDDED_BASE_MODEL, None)
    ids = torch.randint(100, 10_000, (1, prompt), generator=torch.Generator().manual_seed(0))
    runs = {}
    for dtype in DTYPES:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32 if dtype == "int8" else dtype).eval()
        if dtype == "int8":
            quantize_linears_int8(model)
        runs[dtype] = prefill_and_decode(model, ids, tokens)
        del model
    capability = CpuCapability.detect()
    return {"cpu": capability.summary(), "auto": choose_numeric_path("auto", "cpu", False, capability).dtype,
            "runs": runs}


def prefill_and_decode(model: Any, ids: Any, tokens: int) -> dict[str, float]:
    """The model's own forward loop (no generate()): one prefill of `ids` (the last position's logits only, as a
    server computes it), then `tokens` greedy steps."""
    import torch

    with torch.inference_mode():
        model(ids[:, :16])  # warm-up: first-call allocations
        started = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - started
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = tokens / (time.perf_counter() - started)
    return {"prefill_ms": round(prefill * 1000, 1), "decode_tok_s": round(decode, 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help="measure this process's CPU level and print JSON")
    parser.add_argument("--prompt", type=int, default=715)
    parser.add_argument("--tokens", type=int, default=32)
    arguments = parser.parse_args()
    if not arguments.child:
        parser.error("run it through bench/run.py --only 8, or with --child for one CPU level")
    print(json.dumps(_child(arguments.prompt, arguments.tokens)))
