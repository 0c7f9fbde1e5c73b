"""Section 11: our users' model size. A model of Qwen2.5-1.5B-Instruct's shape (28 layers, hidden 1536, MLP 8960,
12 query and 2 key/value heads, biased q/k/v, a tied 151,936-token head), built here with random weights
(nothing is downloaded), next to the embedded SmolLM2-135M.

Per model, at batch 1: decode tokens/s of the bare model's own forward loop in bfloat16 and int8 (no generate(),
no engine), of the served path (`HFLoraBackend.generate`, greedy, what /ask runs) in the dtype TORCH_DTYPE=auto
picks, and the memory-bandwidth ceiling (bytes of weights read per token / the measured read bandwidth); and the
prefill of a 715-token prompt, the size of a RAG prompt. The served / bare ratio (the same prompt, so the same
context length; both timed without the prefill; the two take turns in each round, and the ratio is the median
of the rounds') is the engine's per-token overhead, which the engine issue's target puts at >= 0.9.
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


def _bare_model(folder: str, path: str) -> Any:
    """The bare model in numeric path `path` (float32, bfloat16, or int8: weight-only over bfloat16, as served)."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.llm.numerics.choice import CPU_PATHS
    from app.llm.numerics.int8 import quantize_linears_int8

    spec = CPU_PATHS[path]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, spec.dtype))
    model.eval()
    if spec.quantization == "int8-weight-only":
        quantize_linears_int8(model)
    return model


def _served_decode(backend: Any, tokens: int) -> tuple[float, int]:
    """Decode tokens/s of batch-1 greedy requests on the served path, the prefill excluded as the bare loop's figure
    excludes its own: (tokens - 1) over the time a `tokens`-token request takes beyond a 1-token request on the
    same prompt (streamed pieces cannot time it: the random model's first tokens may decode to no text); its
    prompt tokens."""
    from app.llm.base import GenerationParams

    def timed(budget: int) -> tuple[float, Any]:
        started = time.perf_counter()
        result = asyncio.run(backend.generate(MESSAGES, GenerationParams(budget, 0.0, 1.0), ()))
        return time.perf_counter() - started, result

    first_s, _ = timed(1)
    whole_s, result = timed(tokens)
    if result.completion_tokens < tokens:
        raise RuntimeError(f"the served answer stopped after {result.completion_tokens} of {tokens} tokens")
    return (tokens - 1) / (whole_s - first_s), result.prompt_tokens


def _one_model(folder: str, ctx: Context, tokens: int, repeats: int) -> dict[str, Any]:
    """Served and bare decode at batch 1, taking turns in each of `repeats` rounds; the bare prefills."""
    from app.llm.backends.hf import HFLoraBackend
    from app.llm.base import GenerationParams
    from bench.numerics_bench import prefill_and_decode

    # No prompt KV kept: each request prefills its whole prompt, so subtracting the 1-token request removes it.
    backend = HFLoraBackend.load(ctx.backend_settings(base_model_name=folder, lora_adapters="", prefix_cache_mb=0))
    try:
        asyncio.run(backend.generate(MESSAGES, GenerationParams(4, 0.0, 1.0), ()))  # warm-up
        served_path, reason = backend.facts.numerics.name, backend.facts.numerics.reason
        bare_models = {path: _bare_model(folder, path) for path in dict.fromkeys((served_path, "bfloat16", "int8"))}
        # The bytes a decoded token reads in bfloat16 (the ceiling's reference; int8 reads about half).
        weight_bytes = sum(p.numel() * p.element_size() for p in bare_models["bfloat16"].parameters())
        ids = torch_ids()
        prefill_ms = {dtype: prefill_and_decode(bare, ids, 1)["prefill_ms"] for dtype, bare in bare_models.items()}
        rounds: list[dict[str, Any]] = []
        for _ in range(repeats):  # paired: the machine's speed drifts by 20% within an hour
            served, prompt_tokens = _served_decode(backend, tokens)
            bare_tok_s = {dtype: prefill_and_decode(bare, ids[:, :prompt_tokens], tokens)["decode_tok_s"]
                          for dtype, bare in bare_models.items()}
            rounds.append({"served_tok_s": served, "bare_tok_s": bare_tok_s, "prompt_tokens": prompt_tokens})
        del bare_models
    finally:
        asyncio.run(backend.close())
    median = statistics.median
    return {
        "served_path": served_path, "served_reason": reason, "weight_mb": weight_bytes / 1e6,
        "prefill_ms": prefill_ms, "rounds": rounds,
        "prompt_tokens": rounds[0]["prompt_tokens"], "served_tok_s": median(r["served_tok_s"] for r in rounds),
        "bare_tok_s": {dtype: median(r["bare_tok_s"][dtype] for r in rounds) for dtype in prefill_ms},
        "served_over_bare": median(r["served_tok_s"] / r["bare_tok_s"][served_path] for r in rounds),
    }


def torch_ids() -> Any:
    """PROMPT_TOKENS random token ids, the same in every run."""
    import torch

    return torch.randint(100, 10_000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))


def qwen_shaped(ctx: Context) -> SectionResult:
    tokens, repeats = ctx.size(32, 4), ctx.size(5, 1)
    bandwidth = memory_read_gbs()
    models = {"SmolLM2-135M": ctx.base_model, "Qwen2.5-1.5B-shaped": str(qwen_shaped_folder(ctx))}
    data: dict[str, Any] = {"memory_read_gbs": bandwidth, "tokens": tokens, "prompt_tokens": PROMPT_TOKENS}
    rows = []
    for label, folder in models.items():
        run = data[label] = _one_model(folder, ctx, tokens, repeats)
        served, bare, prefill = run["served_path"], run["bare_tok_s"], run["prefill_ms"]
        ceiling = bandwidth * 1e3 / run["weight_mb"]  # GB/s over MB a token
        run["ceiling_tok_s"] = ceiling
        rows += [
            Row("11", f"{label}: decode batch 1, bare forward loop, bfloat16 / int8",
                f"{bare['bfloat16']:.1f} / {bare['int8']:.1f} tok/s", "", "",
                f"ceiling {ceiling:.0f} tok/s = {bandwidth:.1f} GB/s read / {run['weight_mb']:.0f} MB of bfloat16 "
                "weights per token (int8 reads about half)"),
            Row("11", f"{label}: prefill {PROMPT_TOKENS} tokens, bfloat16 / int8",
                f"{prefill['bfloat16']:.0f} / {prefill['int8']:.0f} ms", "<= 1500 ms (first token of a RAG answer)",
                verdict(min(prefill.values()) <= 1500), "bare forward, last position's logits only"),
            Row("11", f"{label}: decode batch 1, served path ({served}, NUMERIC_PATH=auto) / bare forward loop",
                f"{run['served_tok_s']:.1f} tok/s; {run['served_over_bare']:.2f}x", ">= 0.9x",
                verdict(run["served_over_bare"] >= 0.9),
                f"greedy {tokens} tokens after the same {run['prompt_tokens']}-token prompt, the prefill excluded on "
                f"both (served: a {tokens}-token request less a 1-token one); median of {repeats} rounds' paired "
                "ratios"),
        ]
    return SectionResult(11, "Qwen2.5-1.5B-shaped model", data, rows)
