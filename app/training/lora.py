"""The LoRA configuration: which layers get adapter matrices, per architecture, and attaching them."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from app.training.errors import FinetuneError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

ALL_LINEAR = "all-linear"
_ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# The attention projections carry most of what a small adapter can change in style, at a quarter of
# the parameters of also adapting the MLP; gpt2 fuses q, k and v into one Conv1D.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": _ATTENTION_PROJECTIONS,
    "qwen2": _ATTENTION_PROJECTIONS,
    "mistral": _ATTENTION_PROJECTIONS,
    "gpt2": ["c_attn"],
}


def default_target_modules(model_type: str) -> list[str] | str:
    """The default for a `config.model_type`; unknown architectures get every Linear layer but the output head."""
    return DEFAULT_TARGET_MODULES.get(model_type, ALL_LINEAR)


def parse_target_modules(text: str | None) -> list[str] | str | None:
    """`--target_modules`: a comma-separated list of module names, `all-linear`, or None for the default."""
    if text is None or not text.strip():
        return None
    if text.strip() == ALL_LINEAR:
        return ALL_LINEAR
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise FinetuneError(f"--target_modules {text!r} names no module")
    return names


def attach_lora(
    model: PreTrainedModel,
    target_modules: list[str] | str,
    r: int,
    alpha: int,
    dropout: float,
    *,
    task_type: str = "CAUSAL_LM",
) -> PeftModel:
    """The model wrapped for training: frozen base weights, fresh LoRA matrices on the target modules.

    `task_type` picks PEFT's wrapper class; "FEATURE_EXTRACTION" (classification) saves no extra modules, so the
    adapter still loads onto the plain causal LM."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType(task_type),
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
    )
    try:
        with warnings.catch_warnings():
            # peft 0.21 still reads the deprecated `is_gradient_checkpointing`; the warning is not ours to act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as error:
        suggestions = ", ".join(_linear_module_names(model)[:20])
        raise FinetuneError(
            f"cannot put LoRA on {target_modules!r}: {str(error).splitlines()[0].rstrip('.')}. "
            f"This model's Linear layers are named: {suggestions}"
        ) from None


def _linear_module_names(model: PreTrainedModel) -> list[str]:
    """The distinct last name parts of the model's Linear-like layers, for `--target_modules`."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D)
    }
    return sorted(names)
