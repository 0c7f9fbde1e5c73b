"""Benchmarks of the local backend, printed as a markdown table and written to bench/results/*.json.

    python bench/run.py            # adapter change vs reload, LoRA decode overhead

Absolute times on a shared 2-core machine are noisy: compare the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import Settings  # noqa: E402
from app.llm.base import GenerationParams  # noqa: E402
from app.llm.hf_backend import HFLoraBackend  # noqa: E402
from app.llm.model_source import resolve_base_model  # noqa: E402

MESSAGES = [{"role": "user", "content": "Explain in two sentences what a vector store is."}]


def _random_adapter(base: str, folder: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    model.save_pretrained(folder)
    return folder


def _timed(backend: HFLoraBackend, params: GenerationParams, adapters: tuple | None) -> tuple[float, int]:
    started = time.perf_counter()
    result = asyncio.run(backend.generate(MESSAGES, params, adapters))  # type: ignore[arg-type]
    return time.perf_counter() - started, result.completion_tokens


def adapter_change(settings: Settings, repeats: int) -> dict[str, float]:
    """A request on adapter B right after one on A (both in memory) vs reloading base + adapter from disk."""
    backend = HFLoraBackend.load(settings)
    params = GenerationParams(max_new_tokens=8, temperature=0.0, top_p=1.0)
    _timed(backend, params, (("a", 1.0),))
    switched = []
    for _ in range(repeats):
        _timed(backend, params, (("a", 1.0),))
        switched.append(_timed(backend, params, (("b", 1.0),))[0])
    same = [_timed(backend, params, (("a", 1.0),))[0] for _ in range(repeats)]
    asyncio.run(backend.close())
    reloads = []
    for _ in range(max(2, repeats // 3)):
        started = time.perf_counter()
        fresh = HFLoraBackend.load(settings.model_copy(update={"lora_adapters": f"b={settings.named_adapters['b']}"}))
        _timed(fresh, params, (("b", 1.0),))
        reloads.append(time.perf_counter() - started)
        asyncio.run(fresh.close())
    return {"request_after_other_adapter_s": statistics.median(switched),
            "request_same_adapter_s": statistics.median(same),
            "reload_then_request_s": statistics.median(reloads)}


def decode_speed(settings: Settings, tokens: int) -> dict[str, float]:
    """Decode tokens/s at batch 1: base model, adapter unmerged, adapter merged into the weights."""
    backend = HFLoraBackend.load(settings)
    params = GenerationParams(max_new_tokens=tokens, temperature=0.0, top_p=1.0)
    results = {}
    for label, spec in (("base", ()), ("adapter_unmerged", (("a", 1.0),))):
        _timed(backend, params, spec)  # warm-up
        seconds, count = _timed(backend, params, spec)
        results[label] = count / seconds
    model = backend.adapters.model
    asyncio.run(backend.close())
    merged = model.merge_and_unload(adapter_names=["a"])
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(settings.base_model_name, settings.cache_dir))
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        merged.generate(**ids, max_new_tokens=4, do_sample=False)
        started = time.perf_counter()
        out = merged.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    results["adapter_merged"] = (out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - started)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48, help="tokens decoded per speed measurement")
    args = parser.parse_args()
    base = resolve_base_model("embedded:SmolLM2-135M-Instruct", None)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        adapters = f"a={_random_adapter(base, folder / 'a', 1)},b={_random_adapter(base, folder / 'b', 2)}"
        settings = Settings(_env_file=None, lora_model_path=folder / "none", lora_adapters_dir=folder / "none",
                            lora_adapters=adapters, batch_window_ms=0)
        change = adapter_change(settings, args.repeats)
        speed = decode_speed(settings, args.tokens)
    overhead = change["request_after_other_adapter_s"] - change["request_same_adapter_s"]
    reload_cost = change["reload_then_request_s"] - change["request_same_adapter_s"]
    rows = [
        ("adapter change: request on B after A (in memory)", f"{change['request_after_other_adapter_s']*1000:.0f} ms"),
        ("same request, no change", f"{change['request_same_adapter_s']*1000:.0f} ms"),
        ("naive: reload base + adapter, then request", f"{change['reload_then_request_s']*1000:.0f} ms"),
        ("cost of a reload (reload+request minus request)", f"{reload_cost*1000:.0f} ms"),
        ("cost of an adapter change (difference of medians; noise-level)", f"{overhead*1000:+.0f} ms"),
        ("decode batch 1, base (tok/s)", f"{speed['base']:.1f}"),
        ("decode batch 1, adapter unmerged (tok/s)", f"{speed['adapter_unmerged']:.1f}"),
        ("decode batch 1, adapter merged (tok/s)", f"{speed['adapter_merged']:.1f}"),
        ("unmerged / merged", f"{speed['adapter_unmerged'] / speed['adapter_merged']:.2f}"),
    ]
    print(f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, bfloat16 weights\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps({"adapter_change": change, "decode_tok_s": speed}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
