"""What helps batch-1 decode on CPU: the variants the performance issue asked us to try, side by side.

    python bench/decode_variants.py [--tokens 64] [--rounds 3] [--compile]

Each variant decodes the same greedy chat answer with `generate` on the bare embedded model (the engine adds
nothing measurable at batch 1), interleaved round by round; the table gives medians. `--compile` adds
torch.compile (inductor, static cache), which costs minutes of compilation first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MESSAGES, machine  # noqa: E402


def _variants(source: str, with_compile: bool) -> dict[str, tuple[Any, dict[str, Any], int]]:
    """name -> (model, extra generate arguments, torch threads)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation import CompileConfig

    from app.llm.numerics.int8 import quantize_linears_int8

    def load(dtype: torch.dtype) -> Any:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()

    bf16, fp32, int8 = load(torch.bfloat16), load(torch.float32), load(torch.float32)
    quantize_linears_int8(int8)
    static = {"cache_implementation": "static"}
    variants = {
        "bfloat16 (the default)": (bf16, {}, 2),
        "bfloat16, 1 thread": (bf16, {}, 1),
        "bfloat16, static KV cache": (bf16, static, 2),
        "float32": (fp32, {}, 2),
        "int8 per-channel (ENABLE_QUANTIZATION)": (int8, {}, 2),
        "int8, static KV cache": (int8, static, 2),
    }
    if with_compile:
        compiled = {**static, "compile_config": CompileConfig(dynamic=False, mode="default")}
        compiled["compile_config"]._compile_all_devices = True  # transformers compiles on CUDA only by default
        variants["bfloat16, static cache + torch.compile"] = (bf16, compiled, 2)
    return variants


def _rate(model: Any, ids: Any, tokens: int, extra: dict[str, Any], threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **extra)
        return tokens / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from app.llm.model_source import resolve_base_model

    source = resolve_base_model("embedded:SmolLM2-135M-Instruct", None)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    variants = _variants(source, args.compile)
    runs: dict[str, list[float]] = {name: [] for name in variants}
    measure: Callable[[str, int], float] = lambda name, tokens: _rate(  # noqa: E731
        variants[name][0], ids, tokens, variants[name][1], variants[name][2])
    for name in variants:
        started = time.perf_counter()
        measure(name, 4)  # warm-up (and compilation)
        print(f"warm-up {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    for _ in range(args.rounds):
        for name in variants:
            runs[name].append(measure(name, args.tokens))
    reference = statistics.median(runs["bfloat16 (the default)"])
    facts = machine()
    print(f"{facts.get('cpu', '')}, {facts.get('cores', '')} cores; load average at the end "
          f"{facts.get('load_average', '')}; {args.tokens} tokens, median of {args.rounds}\n")
    print("| variant | decode tok/s, batch 1 | vs bfloat16 |\n|---|---|---|")
    for name, values in runs.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:.1f} | {rate / reference:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
