"""The one small interface every generation backend implements.

The RAG chain talks only to `GenerationBackend`; it does not know whether a local PEFT model or an
Ollama server produces the text.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NotRequired, Protocol, TypedDict, runtime_checkable

ModelUsed = Literal["lora", "base", "ollama", "remote"]
FinishReason = Literal["stop", "length", "cancelled", "repetition", "tool_calls"]
#: A request's adapter choice: () is the base model alone, else (name, weight) pairs; None: server default.
AdapterSpec = tuple[tuple[str, float], ...]
#: The seeds a request may give: torch's generators (and vLLM's, Ollama's) take a 64-bit integer, from -2^63
#: (taken modulo 2^64) to 2^64 - 1; anything outside is the caller's mistake, refused before it reaches the engine.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
#: Receives each new piece of text as it is generated (streaming), on the event loop.
TextCallback = Callable[[str], None]


class ChatMessage(TypedDict):
    """One message of a conversation. An assistant message may carry the tool calls it made (`tool_calls`), and a
    `tool` message is one call's result (`tool_call_id` names the call)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: NotRequired[tuple[ToolCall, ...]]
    tool_call_id: NotRequired[str]


@dataclass(frozen=True)
class Tool:
    """A function the model may call (OpenAI's `tools[].function`); `parameters` is its JSON Schema's canonical
    text."""

    name: str
    description: str = ""
    parameters: str = '{"type":"object"}'

    @property
    def parameters_object(self) -> dict[str, Any]:
        return json.loads(self.parameters)


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: `arguments` is the JSON text of an object, as OpenAI's API carries it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolUse:
    """A request's tools and how the model may use them: `auto` (it may call any or answer in text), `required` (it
    calls at least one), or `named` (it calls the tool `name`); `parallel`: more than one call in a reply."""

    tools: tuple[Tool, ...]
    choice: Literal["auto", "required", "named"] = "auto"
    name: str = ""
    parallel: bool = True

    @property
    def forced(self) -> tuple[Tool, ...]:
        """The tools the reply must call one of; () when the model may answer in text."""
        if self.choice == "auto":
            return ()
        return self.tools if self.choice == "required" else tuple(t for t in self.tools if t.name == self.name)


@dataclass(frozen=True)
class Penalties:
    """What lowers the scores of tokens a row has already generated (neutral by default).

    `presence` and `frequency` are OpenAI's: each generated token's score goes down by `presence` once and by
    `frequency` for every time it was generated. `repetition` is Ollama's (llama.cpp's, HF's) `repeat_penalty` over
    the last `last_n` generated tokens (0: none, -1: all): a positive score is divided by it, a negative one
    multiplied."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    last_n: int = 64

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or (self.repetition != 1.0 and self.last_n != 0))


@dataclass(frozen=True)
class OutputConstraint:
    """What a reply's text must be, whatever the model would rather say: any JSON object (`json_object`), JSON valid
    for a JSON Schema (`json_schema`, `schema` its compact text), or tool calls (`tool_calls`, in the format of
    `app.llm.tools`, each call valid for `schema`). The local engine enforces it token by token; other backends pass
    the JSON ones on."""

    kind: Literal["json_object", "json_schema", "tool_calls"]
    schema: str = ""
    many: bool = False  # tool_calls: up to tools.MAX_CALLS_PER_REPLY calls, not one

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> OutputConstraint:
        return cls("json_schema", canonical_json(schema))

    @property
    def schema_object(self) -> dict[str, Any]:
        """The schema as a JSON object; `{"type": "object"}` for `json_object`."""
        return json.loads(self.schema) if self.schema else {"type": "object"}


def canonical_json(value: object) -> str:
    """A JSON value's compact text (no spaces), for constraints and tools to be compared and cached by. Keys keep
    their order: a schema's properties are generated in the order it gives them (a `reasoning` before an `answer`)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def openai_response_format(constraint: OutputConstraint) -> dict[str, Any]:
    """`constraint` as OpenAI's `response_format` (what vLLM and llama.cpp's server take too)."""
    if constraint.kind == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": constraint.schema_object,
                                                   "strict": True}}


def ollama_format(constraint: OutputConstraint) -> str | dict[str, Any]:
    """`constraint` as Ollama's `format`: "json", or the schema itself."""
    return "json" if constraint.kind == "json_object" else constraint.schema_object


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None  # sampled tokens drawn from this seed's own random stream: the same answer again
    penalties: Penalties = Penalties()
    top_k: int = 0  # sample among the k most likely tokens only; 0: all
    min_p: float = 0.0  # sample among tokens at least this many times as likely as the most likely one
    constraint: OutputConstraint | None = None  # the reply must be JSON (for a schema); None: free text
    tools: ToolUse | None = None  # functions the model may (or must) call instead of answering in text
    logprobs: int | None = None  # report each token's log-probability and this many likeliest others; None: none


EMPTY_ANSWER_NOTICE = (
    "the model generated no text for this request; rephrase it, or try another adapter or the base model"
)
REPETITION_NOTICE = (
    "the answer began repeating itself and was stopped there; rephrase the question, or try another adapter or "
    "the base model"
)


@dataclass(frozen=True)
class TokenChoice:
    """A token and its log-probability where it was chosen: its text (a piece of a character shows as U+FFFD) and
    its exact bytes."""

    token: str
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, and the likeliest tokens at its place (as many as asked for, most likely first)."""

    chosen: TokenChoice
    top: tuple[TokenChoice, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    text: str
    model_used: ModelUsed
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    adapters: str = ""  # the adapter key that answered (`sql`, `sql*0.7+code*0.3`), empty when none
    tool_calls: tuple[ToolCall, ...] = ()  # the calls the model made (finish_reason `tool_calls`); text: the rest
    logprobs: tuple[TokenLogprob, ...] | None = None  # with params.logprobs: one per generated token, in order

    @property
    def notice(self) -> str | None:
        """Said with the answer when there is no text to show, so a blank answer is never silent, and when the
        answer was stopped for repeating itself."""
        if not self.text.strip() and not self.tool_calls:
            return EMPTY_ANSWER_NOTICE
        return REPETITION_NOTICE if self.finish_reason == "repetition" else None


@dataclass(frozen=True)
class ComponentHealth:
    """Whether a component can serve now, and a sentence for the operator when it cannot."""

    ok: bool
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)


def estimate_tokens(text: str) -> int:
    """Tokens of `text` as BPE tokenizers of chat models (Qwen2.5's, Llama 3's) count them, roughly: one per CJK
    character, one per four other characters."""
    cjk = sum(1 for character in text if "\u2e80" <= character <= "\u9fff" or "\uac00" <= character <= "\ud7af"
              or "\uf900" <= character <= "\ufaff" or "\uff00" <= character <= "\uffef")
    return cjk + -(-(len(text) - cjk) // 4)


@runtime_checkable
class AdapterHost(Protocol):
    """A backend whose LoRA adapters can be listed, loaded and unloaded at run time."""

    async def load_adapter(self, name: str, path: Path) -> Any: ...

    async def unload_adapter(self, name: str) -> None: ...

    def adapter_catalogue(self) -> list[dict[str, Any]]: ...

    def mix_catalogue(self) -> list[str]: ...

    def check_adapter(self, name: str) -> None:
        """NotFoundError (404) unless an adapter of that name is loaded."""

    def set_default_adapter(self, name: str) -> None:
        """Later requests naming no adapter use `name` (NotFoundError unless it is loaded)."""

    def default_adapter(self) -> str | None:
        """The adapter requests naming none use (None: the base model)."""


class GenerationBackend(ABC):
    """A chat model that turns messages into text."""

    #: registry name, also the value of `model_used` when no adapter distinction applies
    name: str

    @abstractmethod
    async def generate(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        adapters: AdapterSpec | None = None,
        on_text: TextCallback | None = None,
    ) -> GenerationResult:
        """Generate a reply, calling `on_text` with each new piece when given; raise an `AppError`
        subclass when the backend cannot answer. `adapters` applies to backends with LoRA adapters."""

    @abstractmethod
    async def health(self) -> ComponentHealth:
        """Check, cheaply, that the backend can answer now."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Facts for /model_info (model names, device, quantization)."""

    def count_tokens(self, text: str) -> int:
        """How many of the model's tokens `text` takes; backends without the tokenizer at hand estimate it
        (`estimate_tokens`)."""
        return estimate_tokens(text)

    # Deliberately not abstract: an optional hook, a no-op for backends that hold nothing to release.
    async def close(self) -> None:  # noqa: B027
        """Release resources held by the backend (default: nothing to release)."""
