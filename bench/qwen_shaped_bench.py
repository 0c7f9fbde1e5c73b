"""Section 11: our users' model size. A model of Qwen2.5-1.5B-Instruct's shape (28 layers, hidden 1536, MLP 8960,
12 query and 2 key/value heads, biased q/k/v, a tied 151,936-token head), built here with random weights
(nothing is downloaded), next to the embedded SmolLM2-135M.

Per model, at batch 1: decode tokens/s of the bare model's own forward loop in bfloat16 and int8 (no generate(),
no engine), of the served path (`HFLoraBackend.generate`, greedy, what /ask runs) in the dtype TORCH_DTYPE=auto
picks, and the memory-bandwidth ceiling (bytes of weights read per token / the measured read bandwidth); and the
prefill of a 715-token prompt, the size of a RAG prompt. The served / bare ratio (the same prompt, so the same
context length) is the engine's per-token overhead, which the engine issue's target puts at >= 0.9.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import MESSAGES, Context, Row, SectionResult, memory_read_gbs, verdict

#: Qwen2.5-1.5B-Instruct's config.json, the sizes that set the cost of a token
QWEN_SHAPE = {
    "vocab_size": 151_936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32_768,
    "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PROMPT_TOKENS = 715


def qwen_shaped_folder(ctx: Context) -> Path:
    """The random Qwen2.5-1.5B-shaped model in bfloat16 (3.1 GB), saved once per run with SmolLM2's tokenizer
    (token ids the tokenizer lacks decode to nothing: the text is not what is measured)."""
    folder = ctx.scratch / "qwen2.5-1.5b-shaped"
    if not (folder / "config.json").exists():
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        config = Qwen2Config(**QWEN_SHAPE, dtype="bfloat16")
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
        for name in TOKENIZER_FILES:
            shutil.copy(Path(ctx.base_model) / name, folder / name)
    return folder


def _bare(folder: str, dtype: str, tokens: int, short_prompt: int) -> dict[str, float]:
    """The bare model's forward loop, one row: the prefill of a PROMPT_TOKENS prompt, and `tokens` greedy steps
    after a `short_prompt`-token one (the served request's, so both decode over the same context length)."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.llm.quantization import quantize_linears_int8
    from bench.numerics_bench import prefill_and_decode

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32 if dtype == "int8" else torch.bfloat16)
    model.eval()
    if dtype == "int8":
        quantize_linears_int8(model)
    ids = torch.randint(100, 10_000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    prefill_ms = prefill_and_decode(model, ids, 1)["prefill_ms"]
    decode = prefill_and_decode(model, ids[:, :short_prompt], tokens)["decode_tok_s"]
    del model
    return {"prefill_ms": prefill_ms, "decode_tok_s": decode}


def _served(folder: str, ctx: Context, tokens: int, repeats: int) -> tuple[float, int, str, int]:
    """Median decode tokens/s of batch-1 greedy requests on the served path (their short prefill included);
    weight bytes; its dtype; the request's prompt tokens."""
    from app.llm.base import GenerationParams
    from app.llm.hf_backend import HFLoraBackend

    backend = HFLoraBackend.load(ctx.backend_settings(base_model_name=folder, lora_adapters=""))
    try:
        params = GenerationParams(max_new_tokens=tokens, temperature=0.0, top_p=1.0)
        asyncio.run(backend.generate(MESSAGES, GenerationParams(4, 0.0, 1.0), ()))  # warm-up
        rates, prompt_tokens = [], 0
        for _ in range(repeats):
            started = time.perf_counter()
            result = asyncio.run(backend.generate(MESSAGES, params, ()))
            rates.append(result.completion_tokens / (time.perf_counter() - started))
            prompt_tokens = result.prompt_tokens
        model = backend.adapters.model
        weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
        return statistics.median(rates), weight_bytes, backend.facts.numerics.dtype, prompt_tokens
    finally:
        asyncio.run(backend.close())


def qwen_shaped(ctx: Context) -> SectionResult:
    tokens, repeats = ctx.size(32, 4), ctx.size(3, 1)
    bandwidth = memory_read_gbs()
    models = {"SmolLM2-135M": ctx.base_model, "Qwen2.5-1.5B-shaped": str(qwen_shaped_folder(ctx))}
    data: dict[str, Any] = {"memory_read_gbs": bandwidth, "tokens": tokens, "prompt_tokens": PROMPT_TOKENS}
    rows = []
    for label, folder in models.items():
        served, weight_bytes, dtype, prompt_tokens = _served(folder, ctx, tokens, repeats)
        bare = {dtype: _bare(folder, dtype, tokens, prompt_tokens) for dtype in ("bfloat16", "int8")}
        ceiling = bandwidth * 1e9 / weight_bytes
        ratio = served / bare[dtype]["decode_tok_s"] if dtype in bare else float("nan")
        data[label] = {"bare": bare, "served_tok_s": served, "served_dtype": dtype, "weight_mb": weight_bytes / 1e6,
                       "ceiling_tok_s": ceiling, "served_over_bare": ratio, "prompt_tokens": prompt_tokens}
        rows += [
            Row("11", f"{label}: decode batch 1, bare forward loop, bfloat16 / int8",
                f"{bare['bfloat16']['decode_tok_s']:.1f} / {bare['int8']['decode_tok_s']:.1f} tok/s", "", "",
                f"ceiling {ceiling:.0f} tok/s = {bandwidth:.1f} GB/s read / {weight_bytes / 1e6:.0f} MB of {dtype} "
                "weights per token (int8 reads about half)"),
            Row("11", f"{label}: prefill {PROMPT_TOKENS} tokens, bfloat16 / int8",
                f"{bare['bfloat16']['prefill_ms']:.0f} / {bare['int8']['prefill_ms']:.0f} ms", "<= 1500 ms (first "
                "token of a RAG answer)", verdict(min(run["prefill_ms"] for run in bare.values()) <= 1500), ""),
            Row("11", f"{label}: decode batch 1, served path ({dtype}) / bare forward loop",
                f"{served:.1f} tok/s; {ratio:.2f}x", ">= 0.9x", verdict(ratio >= 0.9),
                f"greedy {tokens} tokens after the same {prompt_tokens}-token prompt, median of {repeats}; the "
                "served figure includes that prompt's prefill"),
        ]
    return SectionResult(11, "Qwen2.5-1.5B-shaped model", data, rows)
