"""The fast paths answer like the plain ones: a batch on one adapter runs with the adapter folded into the
weights (and the base weights come back bit for bit afterwards); int8, output head included, keeps the
float model's answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.llm.backends.hf import HFLoraBackend
from app.llm.base import AdapterSpec, GenerationParams
from app.llm.model_source import resolve_base_model
from tests.conftest import make_settings
from tests.test_adapters import _save_lora

GREEDY = GenerationParams(max_new_tokens=16, temperature=0.0, top_p=1.0)
MESSAGES = [{"role": "user", "content": "Name three fruits."}]

pytestmark = [pytest.mark.slow, pytest.mark.numerics]


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import AutoModelForCausalLM

    source = resolve_base_model("embedded:SmolLM2-135M-Instruct", None)
    folder = tmp_path_factory.mktemp("adapters")
    # Strong enough that each adapter surely changes the greedy answer (at 0.05 "a" sometimes did not).
    paths = {name: _save_lora(AutoModelForCausalLM.from_pretrained(source), folder / name, seed, scale=0.2)
             for name, seed in (("a", 1), ("b", 2))}
    return ",".join(f"{name}={path}" for name, path in paths.items())


def _replies(backend: HFLoraBackend, *specs: AdapterSpec) -> list[str]:
    """Greedy answers for requests sent together (so they share one batch)."""

    async def together() -> list[str]:
        results = await asyncio.gather(*(backend.generate(MESSAGES, GREEDY, spec) for spec in specs))
        return [result.text for result in results]

    return asyncio.run(together())


def _base_weights(backend: HFLoraBackend) -> dict[str, object]:
    """The base model's parameters, named alike whether the PEFT layers are in the model or swapped out."""
    return {name.replace(".base_layer", ""): parameter.detach().clone()
            for name, parameter in backend.adapters.model.named_parameters() if "lora_" not in name}


def test_merged_single_adapter_answers_like_the_mixed_batch(two_adapters: str, tmp_path: Path) -> None:
    # float32 so the merged and the unmerged arithmetic agree to the last greedy token
    backend = HFLoraBackend.load(make_settings(tmp_path, lora_adapters=two_adapters, numeric_path="float32"))
    alone = _replies(backend, (("a", 1.0),))[0]  # one adapter in the batch: merged
    assert backend.describe()["merged_adapter"] == "a"
    mixed = _replies(backend, (("a", 1.0),), (("b", 1.0),), ())  # three different ones: each row's own delta
    assert mixed[0] == alone
    assert mixed[0] != mixed[2]  # adapter a really changes the answer, so the comparison above means something
    assert _replies(backend, (("b", 1.0),))[0] == mixed[1]
    assert _replies(backend, ())[0] == mixed[2]


def test_base_weights_come_back_exactly_after_merges(two_adapters: str, tmp_path: Path) -> None:
    import torch

    backend = HFLoraBackend.load(make_settings(tmp_path, lora_adapters=two_adapters))  # bfloat16
    before = _base_weights(backend)
    base_answer = _replies(backend, ())[0]
    for spec in [(("a", 1.0),), (("b", 1.0),), (("a", 1.0),), (("a", 0.5), ("b", 0.5))]:
        _replies(backend, spec)
    assert _replies(backend, ())[0] == base_answer
    after = _base_weights(backend)
    assert all(torch.equal(before[name], after[name]) for name in before)  # type: ignore[arg-type]


def test_int8_with_quantized_head_keeps_the_answer(tmp_path: Path) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answers = {}
    for path in ("float32", "int8"):
        backend = HFLoraBackend.load(make_settings(tmp_path, numeric_path=path))
        answers[path] = asyncio.run(backend.generate(question, GREEDY)).text
        asyncio.run(backend.close())
    assert backend.describe()["quantization"] == "int8-weight-only"
    assert "Paris" in answers["float32"] and "Paris" in answers["int8"]


def test_changing_back_to_a_recent_adapter_reuses_its_merged_weights(two_adapters: str, tmp_path: Path) -> None:
    backend = HFLoraBackend.load(make_settings(tmp_path, lora_adapters=two_adapters))
    model = backend.adapters.model
    first_a = _replies(backend, (("a", 1.0),))[0]
    merged_a = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").weight
    _replies(backend, (("b", 1.0),))
    assert _replies(backend, (("a", 1.0),))[0] == first_a
    again_a = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").weight
    assert again_a.data_ptr() == merged_a.data_ptr()  # the same tensor: nothing was rebuilt
    asyncio.run(backend.unload_adapter("a"))  # its merged weights go with it
    assert backend.describe()["merged_adapter"] is None
