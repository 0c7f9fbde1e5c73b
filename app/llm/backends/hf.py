"""The local backend: a HuggingFace causal LM with named PEFT LoRA adapters, served by a batching engine.

Heavy imports (torch, transformers, peft) happen inside `load`, so importing this module is cheap and
the app can start on the Ollama backend without them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from app.config import Settings
from app.errors import AppError, BadRequestError, ModelLoadError
from app.llm.adapters.inspect import AdapterInfo
from app.llm.adapters.manager import AdapterManager, AdapterRecord, discover_adapters
from app.llm.base import (
    AdapterSpec,
    ChatMessage,
    ComponentHealth,
    GenerationBackend,
    GenerationParams,
    GenerationResult,
    TextCallback,
    TokenChoice,
    TokenLogprob,
    ToolUse,
)
from app.llm.engine.jobs import GenerationJob, PredictionJob
from app.llm.engine.rows.repetition import RepetitionGuard
from app.llm.model_source import resolve_base_model
from app.llm.numerics.choice import NumericPath, choose_served_path
from app.llm.tools import conversation, forced_calls, openai_tool, read_calls, template_takes_tools

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from app.llm.engine.loop import GenerationEngine

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    """Turn DEVICE (cpu|cuda|auto) into a torch device name, refusing cuda where there is none."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DEVICE=cuda but no CUDA device is available here: allowed values: cpu, auto")
    return requested


@dataclass(frozen=True)
class LoadedModelFacts:
    base_model: str
    device: str
    numerics: NumericPath
    max_position_embeddings: int | None
    hidden_size: int | None = None


class HFLoraBackend(GenerationBackend):
    """One base model in memory with any number of named LoRA adapters, chosen per request."""

    name = "lora"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        adapters: AdapterManager,
        engine: GenerationEngine,
        facts: LoadedModelFacts,
        adapter_errors: dict[str, str],
        settings: Settings | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.settings = settings  # what it was loaded with (the classification service reads its folders here)
        self.adapters = adapters
        self._engine = engine
        self.facts = facts
        self.adapter_errors = adapter_errors

    @classmethod
    def load(cls, settings: Settings) -> HFLoraBackend:
        """Load tokenizer, base model and the adapters found at start (blocking; call it off the event loop)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from app.llm.engine.loop import GenerationEngine

        device = resolve_device(settings.device)
        if device == "cuda" and settings.cuda_memory_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(settings.cuda_memory_fraction)
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        source = resolve_base_model(settings.base_model_name, settings.cache_dir)
        cache_dir = str(settings.cache_dir) if settings.cache_dir else None
        numerics = choose_served_path(settings, device, source)
        dtype = numerics.torch_dtype()
        load_kwargs: dict[str, Any] = {"dtype": dtype, "cache_dir": cache_dir, "trust_remote_code": False}
        if numerics.quantization == "int8-bitsandbytes":
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
            # transformers wraps `to` in functools.wraps, whose typeshed type does not bind self on a method.
            model.to(device)  # type: ignore[arg-type]
        model.eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _make_lm_head_input_contiguous(model)
        if numerics.quantization == "int8-weight-only":
            from app.llm.numerics.int8 import quantize_linears_int8

            quantize_linears_int8(model)

        manager = AdapterManager(
            model,
            max_loaded=settings.max_loaded_adapters,
            default_adapter=settings.default_adapter or None,
            merge_cache_bytes=settings.merge_cache_mb * 2**20,
        )
        adapter_errors = _load_initial_adapters(manager, settings)
        engine = GenerationEngine(
            tokenizer,
            manager,
            max_batch_size=settings.max_batch_size,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            prefix_cache_bytes=settings.prefix_cache_mb * 2**20,
            # A step longer than a whole request may take means every request waiting on it times out anyway.
            stall_seconds=settings.request_timeout_seconds,
            repetition=RepetitionGuard(settings.repetition_min_span, settings.repetition_repeats),
            classify=manager.classifier_hidden,
        )
        facts = LoadedModelFacts(
            base_model=settings.base_model_name,
            device=device,
            numerics=numerics,
            max_position_embeddings=getattr(model.config, "max_position_embeddings", None),
            hidden_size=getattr(model.config, "hidden_size", None),
        )
        logger.info(
            "model ready: base=%s adapters=%s default=%s device=%s dtype=%s quantization=%s (%s; cpu: %s)",
            facts.base_model, manager.names(), manager.default_name, device, numerics.dtype, numerics.quantization,
            numerics.reason, numerics.cpu,
        )
        return cls(tokenizer, manager, engine, facts, adapter_errors, settings)

    async def generate(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        adapters: AdapterSpec | None = None,
        on_text: TextCallback | None = None,
    ) -> GenerationResult:
        choice = self.adapters.resolve(adapters)
        loop = asyncio.get_running_loop()
        tools = params.tools
        constraint = (forced_calls(tools) if tools else None) or params.constraint
        job = GenerationJob(
            input_ids=self.encode(messages, tools),
            params=params,
            adapter=choice,
            # A reply that may call tools is read whole once generated: its calls are not text to stream.
            on_text=_on_loop(loop, on_text) if on_text and not tools else None,
            constraint=await asyncio.to_thread(self._engine.constrained_row, constraint) if constraint else None,
        )
        self._engine.submit(job)
        try:
            await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancelled.set()  # the engine drops the row at its next step
            raise
        logprobs = await asyncio.to_thread(self._logprobs, job) if params.logprobs is not None else None
        text, calls = read_calls(job.text, tools) if tools else (job.text, ())
        if on_text is not None and tools and text.strip():
            on_text(text.strip())
        return GenerationResult(
            text=text.strip(),
            model_used="base" if choice.is_base else "lora",
            prompt_tokens=len(job.input_ids),
            completion_tokens=len(job.tokens),
            finish_reason="tool_calls" if calls else job.finish_reason or "stop",
            adapters="" if choice.is_base else choice.key,
            tool_calls=calls,
            logprobs=logprobs,
        )

    def _logprobs(self, job: GenerationJob) -> tuple[TokenLogprob, ...]:
        """The engine's per-token records as tokens: text (a piece of a character decodes to U+FFFD) and bytes."""

        def choice(token: int, logprob: float) -> TokenChoice:
            text = self._tokenizer.decode([token])
            return TokenChoice(text if isinstance(text, str) else "", self._engine.token_bytes(token), logprob)

        return tuple(TokenLogprob(choice(token, logprob), tuple(choice(*alternative) for alternative in top))
                     for token, logprob, top in job.logprobs)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, messages: list[ChatMessage], tools: ToolUse | None = None) -> list[int]:
        """Prompt token ids through the model's chat template (a plain transcript when it has none), with the
        request's tools, calls and results as the template shows them, or in `app.llm.tools`' text when it has no
        tool support."""
        template = self._tokenizer.chat_template
        native = template_takes_tools(template)
        turns = conversation(messages, tools, native)
        if template:
            listed: list[dict[Any, Any] | Callable[..., Any]] | None = (
                [openai_tool(tool) for tool in tools.tools] if tools and native else None)
            ids = self._tokenizer.apply_chat_template(turns, tools=listed, add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):  # transformers 5 answers a BatchEncoding
                # Never a str with tokenize=True; transformers has no overload that says so.
                ids = ids["input_ids"]  # type: ignore[index]
        else:
            prompt = "".join(f"{turn['role'].capitalize()}: {turn['content']}\n" for turn in turns) + "Assistant:"
            ids = self._tokenizer(prompt)["input_ids"]
        limit = self.facts.max_position_embeddings
        if limit and len(ids) >= limit:
            raise BadRequestError(f"the prompt is {len(ids)} tokens, over the model's limit of {limit}")
        return list(ids)

    async def load_adapter(self, name: str, path: Path) -> AdapterRecord:
        record: AdapterRecord = await anyio.to_thread.run_sync(
            self._engine.call, lambda: self.adapters.load(name, path)
        )
        self.adapter_errors.pop(name, None)
        return record

    async def unload_adapter(self, name: str) -> None:
        # Rows decoding on it (alone or in a mix) finish first; requests naming it meanwhile wait, then get 404.
        await anyio.to_thread.run_sync(lambda: self._engine.call(lambda: self.adapters.unload(name), drain=name))

    def adapter_catalogue(self) -> list[dict[str, Any]]:
        return self.adapters.describe()

    def check_adapter(self, name: str) -> None:
        self.adapters.resolve(((name, 1.0),))

    def set_default_adapter(self, name: str) -> None:
        self.adapters.set_default(name)

    def default_adapter(self) -> str | None:
        return self.adapters.default_name

    def mix_catalogue(self) -> list[str]:
        return self.adapters.mix_keys()

    # -- classification: app/classification's service calls these; the model is only touched on the engine thread

    def encode_texts(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Each text's token ids, cut to its first `max_length` tokens (no chat template: the text as it is)."""
        encoded = self._tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
        return [list(ids) for ids in encoded["input_ids"]]

    async def attach_classifier(self, peft_name: str, info: AdapterInfo) -> None:
        await anyio.to_thread.run_sync(self._engine.call, lambda: self.adapters.attach_classifier(peft_name, info))

    async def detach_classifier(self, peft_name: str) -> None:
        await anyio.to_thread.run_sync(self._engine.call, lambda: self.adapters.detach_classifier(peft_name))

    async def classify(self, peft_name: str, rows: list[list[int]], batch_size: int) -> list[object]:
        """Each row's final hidden state at its last token, with only the classifier's adapter active; queued to
        the engine, which runs it between decode steps in forwards of at most `batch_size` rows."""
        job = PredictionJob(adapter=peft_name, rows=rows, batch_size=batch_size)
        self._engine.submit_prediction(job)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancelled.set()  # the engine drops what it has not run yet
            raise

    @property
    def pending_predictions(self) -> int:
        return self._engine.pending_predictions

    async def health(self) -> ComponentHealth:
        default = self.adapters.default_name
        extra = {"model_used": "lora" if default else "base"}
        problem = self._engine.problem()
        if problem is not None:
            return ComponentHealth(ok=False, detail=problem, extra=extra)
        missing = self.adapters.missing_default
        if missing is not None:
            return ComponentHealth(ok=False, extra=extra, detail=(
                f"the default adapter '{missing}' (DEFAULT_ADAPTER) is not loaded: questions naming no adapter get "
                "503; load it, or set DEFAULT_ADAPTER to a loaded adapter"))
        return ComponentHealth(ok=True, detail="loaded", extra=extra)

    def describe(self) -> dict[str, Any]:
        facts = self.facts
        return {
            "device": facts.device,
            "dtype": facts.numerics.dtype,
            "quantization": facts.numerics.quantization,
            "numeric_path": facts.numerics.describe(),
            "default_adapter": self.adapters.default_name,
            **self._default_adapter_folder(),
            "merged_adapter": self.adapters.merged_adapter,
            "adapters": self.adapters.names(),
            "adapter_errors": dict(self.adapter_errors),
            "prefix_cache": self._engine.prefix_cache_stats(),
        }

    def _default_adapter_folder(self) -> dict[str, Any]:
        """/model_info's `lora_model_path` and `lora_exists` for the default adapter in use, wherever it was
        loaded from (LORA_MODEL_PATH, the adapters folder, /switch_model); nothing when the base model answers."""
        default = self.adapters.default_name
        record = self.adapters.record(default) if default else None
        return {"lora_model_path": str(record.path), "lora_exists": True} if record is not None else {}

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._engine.close)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: TextCallback) -> TextCallback:
    """Deliver streamed pieces from the engine thread to the request's event loop."""

    def deliver(piece: str) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(callback, piece)

    return deliver


def _load_initial_adapters(manager: AdapterManager, settings: Settings) -> dict[str, str]:
    """Attach the adapters found at start; one that fails is reported, not fatal."""
    errors: dict[str, str] = {}
    found = discover_adapters(settings.lora_model_path, settings.lora_adapters_dir, settings.named_adapters)
    for name, path in found.items():
        try:
            manager.load(name, path)
        except AppError as error:
            errors[name] = error.message
            logger.error("adapter %s not loaded: %s", name, error.message)
    if not manager.names():
        logger.warning("no LoRA adapter at LORA_MODEL_PATH=%s: serving the base model", settings.lora_model_path)
    return errors


def _make_lm_head_input_contiguous(model: PreTrainedModel) -> None:
    """The engine feeds lm_head a strided slice of the last position (`logits_to_keep=1`); with frozen weights
    torch then copies the whole (vocab x hidden) weight on every call (measured 4x slower prefill at batch 8, and
    196 ms instead of 10 ms a prefill chunk on SmolLM2). `contiguous()` is not enough: a slice of one row counts
    as contiguous and comes back unchanged, strides and all, so the slice is copied into a fresh tensor (a few KB)."""
    import torch

    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(
            lambda _module, args: (args[0].clone(memory_format=torch.contiguous_format), *args[1:])
        )


def _bitsandbytes_int8_config() -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelLoadError("ENABLE_QUANTIZATION on CUDA needs bitsandbytes: pip install bitsandbytes") from None
    return BitsAndBytesConfig(load_in_8bit=True)

