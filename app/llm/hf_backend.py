"""The local backend: a HuggingFace causal LM with an optional PEFT LoRA adapter.

Heavy imports (torch, transformers, peft) happen inside `load`, so importing this module is cheap and
the app can start on the Ollama backend without them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from app.config import Settings
from app.errors import AdapterError, BadRequestError, ModelLoadError
from app.llm.adapters import AdapterInfo, check_adapter_fits, has_adapter_files, inspect_adapter
from app.llm.base import ChatMessage, ComponentHealth, GenerationBackend, GenerationParams, GenerationResult
from app.llm.model_source import resolve_base_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    """Turn DEVICE (cpu|cuda|auto) into a torch device name, refusing cuda where there is none."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DEVICE=cuda but no CUDA device is available here: allowed values: cpu, auto")
    return requested


def resolve_dtype(requested: str, device: str, quantize: bool) -> torch.dtype:
    """The weights' dtype. auto: bfloat16 (about 2x faster than float32 on CPU, and half the bytes)."""
    import torch

    if quantize and device == "cpu":
        # torch's dynamic int8 Linear takes float32 activations.
        return torch.float32
    if requested == "auto":
        return torch.bfloat16 if device == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


@dataclass(frozen=True)
class LoadedModelFacts:
    base_model: str
    device: str
    dtype: str
    quantization: str
    adapter: AdapterInfo | None
    adapter_error: str | None


class HFLoraBackend(GenerationBackend):
    """Base model plus the LoRA adapter found at LORA_MODEL_PATH (or the base model alone)."""

    name = "lora"

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: LoadedModelFacts
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.facts = facts
        # One forward pass at a time: the model's modules are shared, and 2 cores gain nothing from more.
        self._generate_lock = threading.Lock()

    @property
    def has_adapter(self) -> bool:
        return self.facts.adapter is not None

    @classmethod
    def load(cls, settings: Settings) -> HFLoraBackend:
        """Load tokenizer, base model and adapter (blocking; call it off the event loop)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = resolve_device(settings.device)
        quantize = settings.enable_quantization
        dtype = resolve_dtype(settings.torch_dtype, device, quantize)
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        source = resolve_base_model(settings.base_model_name, settings.cache_dir)
        cache_dir = str(settings.cache_dir) if settings.cache_dir else None
        load_kwargs: dict[str, Any] = {"dtype": dtype, "cache_dir": cache_dir, "trust_remote_code": False}
        if quantize and device == "cuda":
            load_kwargs["quantization_config"] = _bitsandbytes_int8_config()
            load_kwargs["device_map"] = {"": 0}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"cannot load the base model '{settings.base_model_name}': {error}. "
                "Check BASE_MODEL_NAME (an HF hub id available offline, or a folder with config.json)."
            ) from None
        if "device_map" not in load_kwargs:
            model.to(device)
        model.eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _make_lm_head_input_contiguous(model)

        adapter, adapter_error = None, None
        if has_adapter_files(settings.lora_model_path):
            try:
                info = inspect_adapter(settings.lora_model_path)
                check_adapter_fits(model, info)
                model = _attach_adapter(model, info)
                adapter = info
            except AdapterError as error:
                adapter_error = error.message
                logger.error("LoRA adapter not used, serving the base model: %s", error.message)
        else:
            logger.warning(
                "no LoRA adapter at LORA_MODEL_PATH=%s: serving the base model", settings.lora_model_path
            )
        quantization = "none"
        if quantize:
            quantization = "int8-bitsandbytes" if device == "cuda" else _quantize_base_linears_int8(model)
        facts = LoadedModelFacts(
            base_model=settings.base_model_name,
            device=device,
            dtype=str(dtype).removeprefix("torch."),
            quantization=quantization,
            adapter=adapter,
            adapter_error=adapter_error,
        )
        logger.info(
            "model ready: base=%s adapter=%s device=%s dtype=%s quantization=%s",
            facts.base_model,
            adapter.path if adapter else None,
            device,
            facts.dtype,
            quantization,
        )
        return cls(model, tokenizer, facts)

    async def generate(self, messages: list[ChatMessage], params: GenerationParams) -> GenerationResult:
        return await anyio.to_thread.run_sync(self.generate_blocking, messages, params)

    def generate_blocking(self, messages: list[ChatMessage], params: GenerationParams) -> GenerationResult:
        import torch

        inputs = self._encode(messages)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        sampling: dict[str, Any] = {"do_sample": params.temperature > 0}
        if params.temperature > 0:
            sampling.update(temperature=params.temperature, top_p=params.top_p)
        if params.stop:
            sampling.update(stop_strings=list(params.stop), tokenizer=self._tokenizer)
        with self._generate_lock, torch.inference_mode():
            output = self._model.generate(
                **inputs,
                max_new_tokens=params.max_new_tokens,
                pad_token_id=self._tokenizer.pad_token_id,
                **sampling,
            )
        new_tokens = output[0, prompt_tokens:]
        text = self._tokenizer.decode(new_tokens, skip_special_tokens=True)
        for stop in params.stop:
            text = text.split(stop, 1)[0]
        completion_tokens = int(new_tokens.shape[0])
        ended_by_eos = completion_tokens > 0 and int(new_tokens[-1]) in self._eos_token_ids()
        return GenerationResult(
            text=text.strip(),
            model_used="lora" if self.has_adapter else "base",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason="length" if completion_tokens >= params.max_new_tokens and not ended_by_eos else "stop",
        )

    def _encode(self, messages: list[ChatMessage]) -> dict[str, torch.Tensor]:
        if self._tokenizer.chat_template:
            encoded = self._tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            prompt = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
            encoded = self._tokenizer(prompt, return_tensors="pt")
        max_positions = getattr(self._model.config, "max_position_embeddings", None)
        if max_positions and encoded["input_ids"].shape[1] >= max_positions:
            raise BadRequestError(
                f"the prompt is {encoded['input_ids'].shape[1]} tokens, over the model's limit of {max_positions}"
            )
        return {key: value.to(self._model.device) for key, value in encoded.items()}

    def _eos_token_ids(self) -> set[int]:
        eos = self._model.generation_config.eos_token_id
        ids = set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
        if self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        return ids

    async def health(self) -> ComponentHealth:
        return ComponentHealth(ok=True, detail="loaded", extra={"model_used": "lora" if self.has_adapter else "base"})

    def describe(self) -> dict[str, Any]:
        facts = self.facts
        return {
            "device": facts.device,
            "dtype": facts.dtype,
            "quantization": facts.quantization,
            "adapter_loaded": facts.adapter is not None,
            "adapter_error": facts.adapter_error,
            "adapter_rank": facts.adapter.rank if facts.adapter else None,
            "adapter_alpha": facts.adapter.alpha if facts.adapter else None,
            "adapter_target_modules": facts.adapter.target_modules if facts.adapter else None,
        }


def _attach_adapter(model: PreTrainedModel, adapter: AdapterInfo) -> PreTrainedModel:
    """Wrap the base model with the adapter; a base/adapter mismatch becomes an AdapterError."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter.path), adapter_name="default", is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterError(
            f"the adapter at {adapter.path.name} does not fit the base model "
            f"(trained for {adapter.base_model_name_or_path!r}): {first_line}"
        ) from None
    peft_model.eval()
    return peft_model  # type: ignore[no-any-return]


def _make_lm_head_input_contiguous(model: PreTrainedModel) -> None:
    """Generation feeds lm_head a strided slice of the last position; with frozen bf16 weights torch then
    copies the whole (vocab x hidden) weight on every call (measured 4x slower prefill at batch 8)."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


def _quantize_base_linears_int8(model: PreTrainedModel) -> str:
    """Dynamic int8 for every base nn.Linear, leaving LoRA's own A/B matrices and lm_head in float.

    Quantizing a whole PeftModel breaks its LoRA layers, and PEFT refuses to attach to an already
    quantized base; quantizing only the `base_layer` Linears after attaching keeps the adapter live.
    """
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    head = model.get_output_embeddings()
    names = {
        name: default_dynamic_qconfig
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and "lora_" not in name and module is not head
    }
    quantize_dynamic(model, qconfig_spec=names, dtype=torch.qint8, inplace=True)
    logger.info("int8 dynamic quantization applied to %d Linear layers", len(names))
    return "int8-dynamic"


def _bitsandbytes_int8_config() -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelLoadError(
            "ENABLE_QUANTIZATION on CUDA needs bitsandbytes: pip install bitsandbytes"
        ) from None
    return BitsAndBytesConfig(load_in_8bit=True)

