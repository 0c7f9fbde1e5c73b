"""Adapters: safe inspection, serving with an adapter, a mismatched adapter, and int8 with the adapter live."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from app.errors import AdapterError
from app.llm.adapters import inspect_adapter
from app.llm.base import GenerationParams
from app.llm.hf_backend import HFLoraBackend
from app.llm.model_source import resolve_base_model
from tests.conftest import make_settings

if TYPE_CHECKING:
    import torch

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, top_p=1.0)
MESSAGES = [{"role": "user", "content": "Name three fruits."}]


def _save_lora(model: object, folder: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")  # type: ignore[arg-type]
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; a non-zero B makes the adapter change the output
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder


def _next_token_logits(backend: HFLoraBackend) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        return backend._model(**backend._encode(MESSAGES)).logits[0, -1].float()


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
    base_reply, adapted_reply = base.generate_blocking(MESSAGES, GREEDY), adapted.generate_blocking(MESSAGES, GREEDY)
    assert base_reply.model_used == "base" and adapted_reply.model_used == "lora"
    assert adapted_reply.text
    assert not _next_token_logits(adapted).allclose(_next_token_logits(base), atol=1e-3)
    assert adapted.describe()["adapter_rank"] == 8


@pytest.mark.slow
def test_adapter_for_another_base_model_is_reported_not_crashed(foreign_adapter: Path, tmp_path: Path) -> None:
    backend = HFLoraBackend.load(make_settings(tmp_path, lora_model_path=foreign_adapter))
    assert backend.facts.adapter is None
    assert "does not fit the base model" in str(backend.facts.adapter_error)
    assert backend.generate_blocking(MESSAGES, GREEDY).model_used == "base"


@pytest.mark.slow
def test_int8_keeps_the_adapter_live(random_adapter: Path, tmp_path: Path) -> None:
    import torch

    settings = make_settings(tmp_path, lora_model_path=random_adapter, enable_quantization=True)
    backend = HFLoraBackend.load(settings)
    assert backend.describe()["quantization"] == "int8-dynamic"
    reply = backend.generate_blocking(MESSAGES, GREEDY)
    assert reply.model_used == "lora" and reply.text
    quantized = [m for m in backend._model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantized) == 30 * 7  # every base Linear of the 30 blocks; lora_A/B stay float
    # The adapter still acts: turning it off changes the logits.
    inputs = backend._encode(MESSAGES)
    with torch.inference_mode():
        with_adapter = backend._model(**inputs).logits
        with backend._model.disable_adapter():
            without = backend._model(**inputs).logits
    assert not torch.allclose(with_adapter, without)
