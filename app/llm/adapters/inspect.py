"""Safe inspection of LoRA adapter folders before anything is handed to PEFT.

Only `adapter_model.safetensors` is ever loaded (a pickle `.bin` is refused), and `adapter_config.json` is
allow-listed: every field must be one that is inert when saved weights are loaded onto a shared base model.
Unknown fields and values that make PEFT import code (`auto_mapping`), initialise from the base weights and
rewrite them (`init_lora_weights: "pissa"`, `loftq_config`, ...), train or overwrite base tensors (`bias: "all"`,
`trainable_token_indices`) or change the base model's structure (`layer_replication`) are refused by name.
The weights must be finite and their shapes must fit the base model and the config's rank.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import AdapterError

if TYPE_CHECKING:
    from torch import nn

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
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


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == {} or value == []


def _any(_: Any) -> bool:
    return True


# Each field PEFT's LoraConfig knows, with the values accepted. Free fields describe the LoRA matrices, which
# is what loading saved weights creates; the others must keep the value that builds plain LoRA layers.
_CONFIG_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: (_any, "") for name in (
        "peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
        "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
        "layers_to_transform", "layers_pattern", "use_rslora", "use_dora", "lora_bias", "fan_in_fan_out",
        "modules_to_save", "qalora_group_size",
    )},
    "bias": (lambda value: value == "none", '"none" (other values load saved base biases over the shared ones)'),
    "init_lora_weights": (
        lambda value: value in (True, False, "gaussian"),
        'true, false or "gaussian" (other schemes initialise from the base weights and rewrite them)',
    ),
    "megatron_core": (lambda value: value in (None, "megatron.core"), '"megatron.core" (a module PEFT imports)'),
    "auto_mapping": (lambda value: value is None or _is_plain_peft_auto_mapping(value),
                     "null or the plain mapping PEFT writes (it names classes to import)"),
    **{name: (_is_off, "unset (it changes or rewrites the shared base model)") for name in (
        "layer_replication", "trainable_token_indices", "target_parameters", "loftq_config", "eva_config",
        "corda_config", "lora_ga_config", "megatron_config", "arrow_config", "alora_invocation_tokens",
        "kasa_config", "monteclora_config", "velora_config", "use_bdlora", "use_qalora", "ensure_weight_tying",
    )},
}


def _check_config_fields(adapter: str, config: dict[str, Any]) -> None:
    for field, value in config.items():
        rule = _CONFIG_FIELDS.get(field)
        if rule is None:
            raise AdapterError(
                f"adapter '{adapter}': {ADAPTER_CONFIG_FILE} has the field '{field}', which is not accepted "
                "(only fields known to be inert for loading saved LoRA weights are)"
            )
        accepts, allowed = rule
        if not accepts(value):
            raise AdapterError(
                f"adapter '{adapter}': {ADAPTER_CONFIG_FILE} sets {field}={json.dumps(value)[:100]}, which is refused; "
                f"allowed: {allowed}"
            )


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    base_model_name_or_path: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    per_module_ranks: bool  # rank_pattern gives some modules another rank than `rank`


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
    _check_config_fields(folder.name, config)
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
        per_module_ranks=bool(config.get("rank_pattern")),
    )


_PEFT_KEY_PREFIX = "base_model.model."


def check_adapter_fits(model: nn.Module, adapter: AdapterInfo) -> None:
    """Compare the adapter's tensors with the base model's layers and the config's rank, and check every value is
    finite, before PEFT touches the model (PEFT injects layers first and fails half-way; NaN or Inf weights
    would poison every batch the adapter shares)."""
    import torch
    from safetensors import safe_open

    # Once adapters are attached, the model is a PeftModel whose targets wrap the original Linear.
    get_base_model = getattr(model, "get_base_model", None)
    root: nn.Module = get_base_model() if get_base_model is not None else model
    modules = dict(root.named_modules())
    name = adapter.path.name
    ranks: dict[str, dict[str, int]] = {}  # module -> {"A": rows of lora_A, "B": columns of lora_B}
    try:
        with safe_open(str(adapter.path / ADAPTER_WEIGHTS_FILE), framework="pt") as weights:
            for key in weights.keys():
                tensor = weights.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise AdapterError(f"adapter '{name}': the tensor '{key}' holds NaN or infinite values")
                path = key.removeprefix(_PEFT_KEY_PREFIX)
                if ".lora_" not in path:
                    _check_saved_module(modules, adapter, path, tuple(tensor.shape))
                    continue
                module_path, _, matrix = path.rpartition(".lora_")
                _check_lora_tensor(modules, adapter, module_path, matrix, tuple(tensor.shape))
                if matrix.startswith(("A.", "B.")) and tensor.dim() == 2:
                    side = matrix[0]
                    ranks.setdefault(module_path, {})[side] = tensor.shape[0 if side == "A" else 1]
    except AdapterError:
        raise
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise AdapterError(f"adapter '{name}': {ADAPTER_WEIGHTS_FILE} is unreadable ({error})") from None
    for module_path, sides in ranks.items():
        found = sorted(set(sides.values()))
        if len(found) > 1 or (not adapter.per_module_ranks and found != [adapter.rank]):
            raise AdapterError(
                f"adapter '{name}': the LoRA matrices of '{module_path}' have rank {found}, "
                f"but {ADAPTER_CONFIG_FILE} says r={adapter.rank}"
            )


def _check_lora_tensor(
    modules: dict[str, Any], adapter: AdapterInfo, module_path: str, matrix: str, shape: tuple[int, ...]
) -> None:
    """A LoRA tensor must sit on a Linear of the base model, its outer size that layer's in (A) or out size."""
    from torch import nn

    target = modules.get(module_path)
    target = getattr(target, "base_layer", target)
    if not isinstance(target, nn.Linear) or not shape:
        raise AdapterError(
            f"adapter '{adapter.path.name}' targets '{module_path}', which the base model does not have "
            f"as a Linear layer (trained for {adapter.base_model_name_or_path!r})"
        )
    is_a = matrix.startswith("A")
    expected_dim = target.in_features if is_a else target.out_features
    actual_dim = shape[-1] if is_a else shape[0]
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
