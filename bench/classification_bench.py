"""Section 10: classification on the served model, in this process through the service the router calls
(`ClassificationService` over the HF backend's engine).

- predict latency for 16 short texts (one forward of 16 rows, batch_size 16), p50 / p95;
- /ask decode tok/s at batch 1 alone and while predictions run back to back, paired per round (alone, then with
  predictions), so a noisy moment hits both alike.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import MESSAGES, Context, Row, SectionResult, distribution, ms

TEXTS = [
    "Where is my refund?", "The train was late again.", "I love this tea.", "Please reset my password.",
    "The panda is asleep.", "Invoice 42 is overdue.", "Great dumplings!", "Backup failed last night.",
    "How many leave days do I have?", "The library opens at nine.", "Metro line 2 is closed.", "Cancel my order.",
    "My insurance claim was denied.", "Lovely weather today.", "The app keeps crashing.", "Thanks for the help!",
]
LABELS = ["billing", "travel", "food", "it", "other"]
MODEL_DIR = "bench-classifier"


def write_classifier(base: str, root: Path) -> Path:
    """A classifier in the seed layout, as plain PEFT + torch write it: a LoRA (r=8 on q/v, random B), a random
    head and the labels as JSON. Random weights cost what trained ones cost to serve."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = root / MODEL_DIR
    stem = "local-bench"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    model.save_pretrained(folder / f"{stem}.lora")
    hidden = model.get_base_model().config.hidden_size
    torch.save({"score.weight": torch.randn(len(LABELS), hidden, generator=generator) * 0.05,
                "score.bias": torch.zeros(len(LABELS))}, folder / f"{stem}.head.pt")
    (folder / f"{stem}.labels.json").write_text(json.dumps(LABELS))
    return folder


async def _decode_rate(backend: Any, tokens: int) -> float:
    from app.llm.base import GenerationParams

    started = time.perf_counter()
    result = await backend.generate(MESSAGES, GenerationParams(max_new_tokens=tokens, temperature=0.0, top_p=1.0))
    return float(result.completion_tokens / (time.perf_counter() - started))


async def _predict_loop(service: Any, stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await service.predict(MODEL_DIR, TEXTS, 3, 16)
        latencies.append(time.perf_counter() - started)


async def _measure(ctx: Context) -> dict[str, Any]:
    from app.classification.service import ClassificationService
    from app.llm.manager import LORA, ModelManager

    root = ctx.scratch / "classifiers"
    if not (root / MODEL_DIR).is_dir():
        write_classifier(ctx.base_model, root)
    settings = ctx.backend_settings(lora_adapters="", classifier_models_path=root)
    models = ModelManager(settings)
    await models.start()
    try:
        service = ClassificationService(models)
        await service.load(MODEL_DIR, 512)
        backend = models.loaded(LORA)
        for _ in range(3):  # warm-up: the adapter's merged weights are built on the first prediction
            await service.predict(MODEL_DIR, TEXTS, 3, 16)
        await _decode_rate(backend, 4)
        alone_predict = []
        for _ in range(ctx.size(30, 3)):
            started = time.perf_counter()
            await service.predict(MODEL_DIR, TEXTS, 3, 16)
            alone_predict.append(time.perf_counter() - started)
        tokens = ctx.size(64, 12)
        alone, during, during_predict = [], [], []
        for _ in range(ctx.size(5, 1)):
            alone.append(await _decode_rate(backend, tokens))
            stop = asyncio.Event()
            loop = asyncio.create_task(_predict_loop(service, stop, during_predict))
            await asyncio.sleep(0.05)  # predictions are queued when the request arrives
            during.append(await _decode_rate(backend, tokens))
            stop.set()
            await loop
        await service.unload(MODEL_DIR)
        dtype = backend.facts.numerics.dtype  # type: ignore[union-attr]
    finally:
        await models.close()
    return {"texts": len(TEXTS), "labels": len(LABELS), "tokens": tokens, "dtype": dtype,
            "predict_s": distribution(alone_predict), "all_predict_s": alone_predict,
            "decode_alone_tok_s": alone, "decode_with_predictions_tok_s": during,
            "predict_while_decoding_s": distribution(during_predict), "predictions_while_decoding": len(during_predict),
            "ratio": statistics.median(w / a for w, a in zip(during, alone, strict=True))}


def classification(ctx: Context) -> SectionResult:
    data = asyncio.run(_measure(ctx))
    predict, busy = data["predict_s"], data["predict_while_decoding_s"]
    alone = statistics.median(data["decode_alone_tok_s"])
    during = statistics.median(data["decode_with_predictions_tok_s"])
    rounds = len(data["decode_alone_tok_s"])
    rows = [
        Row("10", f"predict, {data['texts']} short texts (one forward, batch_size 16): p50 / p95",
            f"{ms(predict['p50'])} / {ms(predict['p95'])}",
            note=f"{predict['n']} requests through ClassificationService, {data['labels']} labels, LoRA r=8 on q/v "
                 f"folded into the weights, {data['dtype']}"),
        Row("10", "/ask decode batch 1, alone", f"{alone:.1f} tok/s",
            note=f"{data['tokens']} tokens, median of {rounds}"),
        Row("10", "/ask decode batch 1, while predictions run back to back", f"{during:.1f} tok/s",
            note=f"with / alone = {data['ratio']:.2f} (paired per round); {data['predictions_while_decoding']} "
                 f"predictions meanwhile, p50 {ms(busy['p50']) if busy else '-'} (they run between decode steps "
                 "while they have taken less time than the generation)"),
    ]
    return SectionResult(10, "Classification", data, rows)
