"""Safe inspection of LoRA adapter folders before anything is handed to PEFT.

Only `adapter_model.safetensors` is ever loaded (a pickle `.bin` is refused), and `adapter_config.json`
is validated: LoRA only, no `auto_mapping` or other hooks that make PEFT import code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import AdapterError

if TYPE_CHECKING:
    from torch import nn

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
# Fields that make PEFT import or execute code named in the file.
_FORBIDDEN_CONFIG_FIELDS = ("auto_mapping", "custom_modules", "trust_remote_code")
_MAX_CONFIG_BYTES = 1_000_000


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _is_plain_peft_auto_mapping(value: Any) -> bool:
    """PEFT writes {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models..."}."""
    return (
        isinstance(value, dict)
        and set(value) <= {"base_model_class", "parent_library"}
        and _IDENTIFIER.match(str(value.get("base_model_class", ""))) is not None
        and str(value.get("parent_library", "")).startswith("transformers.")
    )


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    base_model_name_or_path: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int


def has_adapter_files(folder: Path) -> bool:
    """True when the folder looks like an adapter (a config file is there), valid or not."""
    return (folder / ADAPTER_CONFIG_FILE).is_file()


def inspect_adapter(folder: Path) -> AdapterInfo:
    """Validate an adapter folder without loading weights; raise AdapterError saying what is wrong."""
    config_path = folder / ADAPTER_CONFIG_FILE
    weights_path = folder / ADAPTER_WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterError(f"no {ADAPTER_CONFIG_FILE} in the adapter folder '{folder.name}'")
    if not weights_path.is_file():
        if (folder / PICKLE_WEIGHTS_FILE).exists():
            raise AdapterError(
                f"adapter '{folder.name}' has only {PICKLE_WEIGHTS_FILE} (a pickle, refused for safety): "
                f"re-save it with save_pretrained(..., safe_serialization=True)"
            )
        raise AdapterError(f"no {ADAPTER_WEIGHTS_FILE} in the adapter folder '{folder.name}'")
    if config_path.stat().st_size > _MAX_CONFIG_BYTES:
        raise AdapterError(f"{ADAPTER_CONFIG_FILE} of '{folder.name}' is implausibly large")
    try:
        config: Any = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{ADAPTER_CONFIG_FILE} of '{folder.name}' is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{ADAPTER_CONFIG_FILE} of '{folder.name}' must be a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter '{folder.name}' is not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    forbidden = [name for name in _FORBIDDEN_CONFIG_FIELDS if config.get(name)]
    if "auto_mapping" in forbidden and _is_plain_peft_auto_mapping(config["auto_mapping"]):
        forbidden.remove("auto_mapping")  # what PEFT itself writes without task_type; we never import it
    if forbidden:
        raise AdapterError(f"adapter '{folder.name}' sets {', '.join(forbidden)}, which is refused")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"adapter '{folder.name}' has no valid r / lora_alpha in {ADAPTER_CONFIG_FILE}")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return AdapterInfo(
        path=folder,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        rank=rank,
        alpha=float(alpha),
        target_modules=sorted(str(t) for t in targets),
        size_bytes=weights_path.stat().st_size,
    )


_PEFT_KEY_PREFIX = "base_model.model."


def check_adapter_fits(model: nn.Module, adapter: AdapterInfo) -> None:
    """Compare the adapter's LoRA matrix shapes with the base model's layers before PEFT touches the model
    (PEFT injects layers first and fails half-way, leaving the model modified)."""
    from safetensors import safe_open
    from torch import nn

    # Once adapters are attached, the model is a PeftModel whose targets wrap the original Linear.
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(root.named_modules())
    try:
        with safe_open(str(adapter.path / ADAPTER_WEIGHTS_FILE), framework="pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise AdapterError(f"adapter '{adapter.path.name}': {ADAPTER_WEIGHTS_FILE} is unreadable ({error})") from None
    for key, shape in shapes.items():
        path = key.removeprefix(_PEFT_KEY_PREFIX)
        if ".lora_" not in path:
            _check_saved_module(modules, adapter, path, shape)
            continue
        module_path, _, matrix = path.rpartition(".lora_")
        target = modules.get(module_path)
        target = getattr(target, "base_layer", target)
        if not isinstance(target, nn.Linear):
            raise AdapterError(
                f"adapter '{adapter.path.name}' targets '{module_path}', which the base model does not have "
                f"as a Linear layer (trained for {adapter.base_model_name_or_path!r})"
            )
        expected_dim = target.in_features if matrix.startswith("A") else target.out_features
        actual_dim = shape[1] if matrix.startswith("A") else shape[0]
        if actual_dim != expected_dim:
            raise AdapterError(
                f"adapter '{adapter.path.name}' does not fit the base model: '{module_path}' has size "
                f"{expected_dim}, the adapter expects {actual_dim} (trained for {adapter.base_model_name_or_path!r})"
            )


def _check_saved_module(modules: dict[str, Any], adapter: AdapterInfo, path: str, shape: tuple[int, ...]) -> None:
    """A full tensor saved with the adapter (`modules_to_save`, e.g. lm_head.weight) must match the base."""
    module_path, _, parameter = path.rpartition(".")
    module = modules.get(module_path)
    module = getattr(module, "original_module", module)
    existing = getattr(module, parameter, None)
    if existing is None or tuple(existing.shape) != shape:
        raise AdapterError(
            f"adapter '{adapter.path.name}' does not fit the base model: it saves '{path}' with shape {shape}, "
            f"which the base model does not have (trained for {adapter.base_model_name_or_path!r})"
        )
