"""Section 8: the numeric path. Prefill and decode of the bare model in each path (float32, bfloat16, int8), on this
CPU and on it held to AVX2 kernels (an AVX2-only machine, such as the AMD EPYC of the engine issue), the cost of a
typical answer (the prompt's prefill plus 128 decoded tokens) in each, and what NUMERIC_PATH=auto picks from its
own measurement of the model's layers: it should be the path whose real answer is cheapest, or within 10% of it.

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
PATHS = ("float32", "bfloat16", "int8")
ANSWER_TOKENS = 128


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
        runs = measured["runs"]
        answer = {path: run["prefill_ms"] / 1000 + ANSWER_TOKENS / run["decode_tok_s"] for path, run in runs.items()}
        cheapest = min(answer, key=answer.__getitem__)
        auto = measured["auto"]
        figures = ", ".join(f"{path} {run['prefill_ms']:.0f} ms / {run['decode_tok_s']:.1f} tok/s / "
                            f"answer {answer[path]:.1f} s" for path, run in runs.items())
        rows.append(Row("8", f"prefill {prompt} tok, decode, {prompt}+{ANSWER_TOKENS} answer; {label} "
                             f"({measured['cpu']})", figures,
                        "auto's answer within 10% of the cheapest path's",
                        verdict(answer[auto] <= answer[cheapest] * 1.1), f"auto picks {auto}: {measured['reason']}"))
    return SectionResult(8, "numeric paths", data, rows)


def _child(prompt: int, tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from app.config import EMBEDDED_BASE_MODEL
    from app.llm.model_source import resolve_base_model
    from app.llm.numerics.calibration import TypicalAnswer, measure_for_model
    from app.llm.numerics.choice import CPU_PATHS, CpuCapability, choose_numeric_path
    from app.llm.numerics.int8 import quantize_linears_int8

    source = resolve_base_model(EMBEDDED_BASE_MODEL, None)
    capability = CpuCapability.detect()
    auto = choose_numeric_path(("auto", "auto"), "cpu", measure_for_model(source, None, 512),
                               TypicalAnswer(prompt, ANSWER_TOKENS), capability=capability)
    ids = torch.randint(100, 10_000, (1, prompt), generator=torch.Generator().manual_seed(0))
    runs = {}
    for path in PATHS:
        spec = CPU_PATHS[path]
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, spec.dtype)).eval()
        if spec.quantization == "int8-weight-only":
            quantize_linears_int8(model)
        runs[path] = prefill_and_decode(model, ids, tokens)
        del model
    return {"cpu": capability.summary(), "auto": auto.name, "reason": auto.reason, "runs": runs}


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
