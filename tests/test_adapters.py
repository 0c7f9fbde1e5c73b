"""Adapters: safe inspection, serving with an adapter, a mismatched adapter, and int8 with the adapter live."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from app.errors import AdapterError
from app.llm.adapters.inspect import inspect_adapter
from app.llm.backends.hf import HFLoraBackend
from app.llm.base import AdapterSpec, GenerationParams, GenerationResult
from app.llm.model_source import resolve_base_model
from tests.conftest import make_settings

if TYPE_CHECKING:
    import torch

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, top_p=1.0)
MESSAGES = [{"role": "user", "content": "Name three fruits."}]


def _save_lora(model: object, folder: Path, seed: int, scale: float = 0.05) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # PEFT draws A from the global generator: the same seed, the same adapter every run
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")  # type: ignore[arg-type]
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; a non-zero B makes the adapter change the output
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder


def _next_token_logits(backend: HFLoraBackend) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        return backend.adapters.model(torch.tensor([backend.encode(MESSAGES)])).logits[0, -1].float()


def _reply(backend: HFLoraBackend, adapters: AdapterSpec | None = None) -> GenerationResult:
    return asyncio.run(backend.generate(MESSAGES, GREEDY, adapters))


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_base_model("embedded:SmolLM2-135M-Instruct", None))
    return _save_lora(base, tmp_path_factory.mktemp("adapter") / "random", seed=1)


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained for another (tiny) Llama: same module names, other hidden size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=49152))
    return _save_lora(tiny, tmp_path_factory.mktemp("adapter") / "foreign", seed=2)


def _edited_copy(adapter: Path, tmp_path: Path, **config_changes: object) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config.update(config_changes)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.slow
def test_pickle_only_adapter_is_refused(random_adapter: Path, tmp_path: Path) -> None:
    copy = _edited_copy(random_adapter, tmp_path)
    (copy / "adapter_model.safetensors").rename(copy / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle"):
        inspect_adapter(copy)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "not a LoRA adapter"),
        ({"auto_mapping": {"base_model_class": "Evil", "parent_library": "os"}}, "auto_mapping"),
        ({"r": "eight"}, "r / lora_alpha"),
    ],
)
def test_unsafe_or_invalid_config_is_refused(random_adapter: Path, tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        inspect_adapter(_edited_copy(random_adapter, tmp_path, **change))


@pytest.mark.slow
def test_adapter_is_served_and_changes_the_answer(random_adapter: Path, tmp_path: Path) -> None:
    base = HFLoraBackend.load(make_settings(tmp_path))
    adapted = HFLoraBackend.load(make_settings(tmp_path, lora_model_path=random_adapter))
    base_reply, adapted_reply = _reply(base), _reply(adapted)
    assert base_reply.model_used == "base" and adapted_reply.model_used == "lora"
    assert adapted_reply.text and adapted_reply.adapters == "default"
    assert not _next_token_logits(adapted).allclose(_next_token_logits(base), atol=1e-3)
    assert adapted.adapter_catalogue()[0]["rank"] == 8 and adapted.describe()["adapters"] == ["default"]
    assert _reply(adapted, ()).model_used == "base"  # the base model alone, on the same instance


@pytest.mark.slow
def test_adapter_for_another_base_model_is_reported_not_crashed(foreign_adapter: Path, tmp_path: Path) -> None:
    backend = HFLoraBackend.load(make_settings(tmp_path, lora_model_path=foreign_adapter))
    assert backend.adapters.names() == []
    assert "does not fit the base model" in backend.adapter_errors["default"]
    assert _reply(backend).model_used == "base"


@pytest.mark.slow
def test_int8_keeps_adapters_attachable_and_live(random_adapter: Path, tmp_path: Path) -> None:
    import torch

    from app.llm.numerics.int8 import WeightOnlyInt8Linear

    # ENABLE_QUANTIZATION=true is the design card's name for NUMERIC_PATH=int8.
    backend = HFLoraBackend.load(make_settings(tmp_path, lora_model_path=random_adapter, enable_quantization=True))
    assert backend.describe()["quantization"] == "int8-weight-only"
    assert backend.describe()["numeric_path"]["reason"].startswith("ENABLE_QUANTIZATION=true")
    model = backend.adapters.model
    # 30 blocks' Linears + the head
    assert sum(isinstance(m, WeightOnlyInt8Linear) for m in model.modules()) == 30 * 7 + 1
    reply = _reply(backend)
    assert reply.model_used == "lora" and reply.text
    # A second adapter attaches to the quantized base at run time, and adapters still act.
    asyncio.run(backend.load_adapter("second", random_adapter))
    assert _reply(backend, (("second", 1.0),)).model_used == "lora"
    with_adapter = _next_token_logits(backend)
    with model.disable_adapter():
        without = _next_token_logits(backend)
    assert not torch.allclose(with_adapter, without)
