"""Crafted and broken adapters against the real model: none may change the shared base weights, leave state
behind, poison other requests, or turn an unload or eviction into errors for everyone."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.errors import AdapterError, BackendUnavailableError, NumericalFailureError
from app.llm.adapters.paths import resolve_adapter_path
from app.llm.backends.hf import HFLoraBackend
from app.llm.base import AdapterSpec, GenerationParams
from app.llm.model_source import resolve_base_model
from tests.conftest import make_settings
from tests.test_adapters import _edited_copy, _save_lora

pytestmark = [pytest.mark.slow, pytest.mark.numerics]

GREEDY = GenerationParams(max_new_tokens=8, temperature=0.0, top_p=1.0)
MESSAGES: Any = [{"role": "user", "content": "Name three fruits."}]
BASE: AdapterSpec = ()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random LoRAs on q/v that change the answer, and one whose finite but huge weights overflow."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("crafted")
    source = resolve_base_model("embedded:SmolLM2-135M-Instruct", None)
    made = {name: _save_lora(AutoModelForCausalLM.from_pretrained(source), folder / name, seed, scale=0.2)
            for name, seed in (("one", 11), ("two", 12))}
    huge = folder / "huge"
    shutil.copytree(made["one"], huge)
    weights = load_file(huge / "adapter_model.safetensors")
    save_file({key: tensor.fill_(1e20) for key, tensor in weights.items()}, huge / "adapter_model.safetensors")
    return {**made, "huge": huge}


def _backend(tmp_path: Path, **overrides: Any) -> HFLoraBackend:
    return HFLoraBackend.load(make_settings(tmp_path, **overrides))


def _text(backend: HFLoraBackend, spec: AdapterSpec | None) -> str:
    return asyncio.run(backend.generate(MESSAGES, GREEDY, spec)).text


def _base_fingerprint(backend: HFLoraBackend) -> str:
    """A hash of every base weight as it sits in the model after a base-model answer (the plain model then runs
    with its original tensors), with the base answer itself."""
    import torch

    answer = _text(backend, BASE)
    digest = hashlib.sha256(answer.encode())
    weights = {name.removeprefix("base_model.model."): parameter
               for name, parameter in backend.adapters.model.named_parameters()}  # PEFT's wrapper adds the prefix
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load(backend: HFLoraBackend, name: str, path: Path) -> None:
    asyncio.run(backend.load_adapter(name, path))


def _unload(backend: HFLoraBackend, name: str) -> None:
    asyncio.run(backend.unload_adapter(name))


def test_unloading_the_active_default_adapter_leaves_every_other_request_working(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    backend = _backend(tmp_path, lora_model_path=adapters["one"])
    base_answer, default_answer = _text(backend, BASE), _text(backend, None)
    assert default_answer != base_answer
    _load(backend, "two", adapters["two"])
    _unload(backend, "default")  # the adapter PEFT last had active
    two_answer = _text(backend, (("two", 1.0),))
    assert two_answer not in {base_answer, default_answer}
    assert _text(backend, None) == two_answer  # the only adapter left is the implicit default, as documented
    _unload(backend, "two")  # no adapter left at all
    assert _text(backend, None) == _text(backend, BASE) == base_answer
    _load(backend, "again", adapters["one"])  # loading works again, and answers as before
    assert _text(backend, (("again", 1.0),)) == default_answer


def test_evicting_the_active_adapter_keeps_loads_and_answers_working(adapters: dict[str, Path], tmp_path: Path) -> None:
    backend = _backend(tmp_path, max_loaded_adapters=1)
    before = _base_fingerprint(backend)
    _load(backend, "one", adapters["one"])
    one_answer = _text(backend, (("one", 1.0),))
    _load(backend, "two", adapters["two"])  # evicts "one", the active adapter
    assert _text(backend, (("two", 1.0),)) != one_answer
    assert _text(backend, (("one", 1.0),)) == one_answer  # attached again on demand, "two" evicted in turn
    assert {entry["name"]: entry["evictions"] for entry in backend.adapter_catalogue()} == {"one": 1, "two": 1}
    assert _base_fingerprint(backend) == before


def test_a_gone_explicit_default_adapter_is_a_503_naming_it(adapters: dict[str, Path], tmp_path: Path) -> None:
    backend = _backend(tmp_path, lora_model_path=adapters["one"], default_adapter="default")
    base_answer = _text(backend, BASE)
    _unload(backend, "default")
    with pytest.raises(BackendUnavailableError, match="'default' \\(DEFAULT_ADAPTER\\) is not loaded"):
        _text(backend, None)
    assert _text(backend, BASE) == base_answer


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"init_lora_weights": "olora"}, "init_lora_weights"),
        ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, "init_lora_weights"),
        ({"bias": "all"}, "bias"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"megatron_config": {"tensor_model_parallel_size": 1}}, "megatron_config"),
        ({"custom_modules": {"q_proj": "os.system"}}, "custom_modules"),
        ({"something_new": 1}, "something_new"),
    ],
)
def test_config_fields_that_would_touch_the_base_model_are_refused_by_name(
    adapters: dict[str, Path], tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    backend = _backend(tmp_path)
    before = _base_fingerprint(backend)
    with pytest.raises(AdapterError, match=field):
        _load(backend, "crafted", _edited_copy(adapters["one"], tmp_path, **change))
    assert backend.adapters.names() == [] and _base_fingerprint(backend) == before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_load(adapters: dict[str, Path], tmp_path: Path, value: float) -> None:
    from safetensors.torch import load_file, save_file

    crafted = _edited_copy(adapters["one"], tmp_path)
    weights = load_file(crafted / "adapter_model.safetensors")
    first = sorted(key for key in weights if "lora_B" in key)[0]
    weights[first][0, 0] = value
    save_file(weights, crafted / "adapter_model.safetensors")
    backend = _backend(tmp_path)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        _load(backend, "crafted", crafted)
    assert backend.adapters.names() == []


def test_an_adapter_that_overflows_fails_only_its_own_row(adapters: dict[str, Path], tmp_path: Path) -> None:
    backend = _backend(tmp_path)
    _load(backend, "huge", adapters["huge"])
    alone = _text(backend, BASE)

    async def together() -> list[Any]:
        return await asyncio.gather(backend.generate(MESSAGES, GREEDY, BASE),
                                    backend.generate(MESSAGES, GREEDY, (("huge", 1.0),)), return_exceptions=True)

    base_result, huge_result = asyncio.run(together())
    assert not isinstance(base_result, BaseException) and base_result.text == alone
    assert isinstance(huge_result, NumericalFailureError) and huge_result.status_code == 422
    assert isinstance(asyncio.run(together())[0], type(base_result))  # and again: nothing stuck


def test_a_failed_load_leaves_nothing_behind_and_says_why_in_full(adapters: dict[str, Path], tmp_path: Path) -> None:
    backend = _backend(tmp_path)
    _load(backend, "two", adapters["two"])
    before = _base_fingerprint(backend)
    # The file's rank (8) against the config's: refused before PEFT is called ...
    with pytest.raises(AdapterError, match=r"rank \[8\], but adapter_config.json says r=4"):
        _load(backend, "broken", _edited_copy(adapters["one"], tmp_path / "rank", r=4))
    # ... and where a rank_pattern hides it, PEFT fails half-way; its half-made adapter is removed.
    half_way = _edited_copy(adapters["one"], tmp_path / "pattern", rank_pattern={"q_proj": 4})
    tensors = []  # counted right after each failure, with PEFT's layers (and any leftovers) in the model
    for _ in range(3):
        with pytest.raises(AdapterError) as failure:
            _load(backend, "broken", half_way)
        assert "size mismatch" in failure.value.message and "copying a param with shape" in failure.value.message
        tensors.append(_tensor_count(backend))
    assert len(set(tensors)) == 1
    assert "broken" not in backend.adapters.model.peft_config and backend.adapters.names() == ["two"]
    assert _base_fingerprint(backend) == before
    _load(backend, "broken", adapters["one"])  # the name is free for a valid folder
    assert _text(backend, (("broken", 1.0),)) != _text(backend, BASE)


def _tensor_count(backend: HFLoraBackend) -> int:
    return sum(1 for _ in backend.adapters.model.parameters())


def test_base_weights_stay_bit_identical_through_mixes_and_unloads(adapters: dict[str, Path], tmp_path: Path) -> None:
    backend = _backend(tmp_path, max_loaded_adapters=3)
    before = _base_fingerprint(backend)
    for name in ("one", "two"):
        _load(backend, name, adapters[name])
        _text(backend, ((name, 1.0),))
        assert _base_fingerprint(backend) == before
    _text(backend, (("one", 0.7), ("two", 0.3)))  # a weighted mix, built and merged
    assert _base_fingerprint(backend) == before
    _unload(backend, "one")  # takes the mix with it
    _unload(backend, "two")
    assert _base_fingerprint(backend) == before


def test_adapter_paths_that_break_the_file_system_are_400s(tmp_path: Path, adapters: dict[str, Path]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(root / "loop", root / "loop")
    for path, reason in (("a" * 300, "File name too long"), ("loop", "Symlink loop"), ("loop/x", "Symlink loop")):
        with pytest.raises(AdapterError, match=reason):
            resolve_adapter_path(path, root, [])


def test_a_file_linked_outside_the_allowed_folders_is_refused(tmp_path: Path, adapters: dict[str, Path]) -> None:
    root = tmp_path / "root"
    inside = root / "linked"
    inside.mkdir(parents=True)
    (inside / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    os.symlink(adapters["one"] / "adapter_model.safetensors", inside / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="adapter_model.safetensors in the adapter folder links outside"):
        resolve_adapter_path("linked", root, [])
    assert resolve_adapter_path("linked", root, [adapters["one"]]) == inside.resolve()  # inside an allowed root

