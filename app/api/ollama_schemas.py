"""Request and response models of the Ollama-compatible API (`/api/*`), after docs/api.md of ollama/ollama.

Ollama's server ignores fields it does not know, and so do these models: Ollama's clients send what their
version knows. Fields asking for what this server cannot do (images, thinking, `raw` prompts,
fill-in-the-middle `suffix`, a custom `template`) are refused with 400 rather than dropped. `format` ("json" or a
JSON Schema) holds the reply to JSON; `tools` are offered to the model, which
may call them (`message.tool_calls`).
`options` takes every Ollama option; `num_predict`, `temperature`, `top_p`, `top_k`, `min_p`, `stop`, `seed`,
`repeat_penalty`, `repeat_last_n`, `presence_penalty` and `frequency_penalty` are used, `rag: true` answers from
the indexed documents, the others change nothing here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from app.api.schemas import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    RequestModel,
    Seed,
    ToolParam,
    json_constraint,
    offered_tools,
)
from app.errors import BadRequestError
from app.llm.base import (
    ChatMessage,
    GenerationParams,
    OutputConstraint,
    Penalties,
    TokenChoice,
    TokenLogprob,
    ToolCall,
    ToolUse,
)

#: the Ollama server version whose API this one follows (clients check it before using newer fields)
OLLAMA_API_VERSION = "0.6.3"


class OllamaOptions(RequestModel):
    model_config = ConfigDict(extra="allow")

    num_predict: StrictInt | None = Field(
        None, description="tokens to generate; at most the server's MAX_NEW_TOKENS; -1, -2 or 0: that limit"
    )
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="0: greedy")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stop: list[Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]] | None = Field(
        None, max_length=MAX_STOP_SEQUENCES, description=f"up to {MAX_STOP_SEQUENCES} stop strings"
    )
    seed: Seed | None = Field(
        None, description="a 64-bit integer: the same seed and options give the same answer again"
    )
    rag: StrictBool | None = Field(None, description="true: answer from the indexed documents (like a `:rag` model)")
    repeat_penalty: float | None = Field(
        None, gt=0, le=10, allow_inf_nan=False,
        description="scores of the last repeat_last_n generated tokens divided by it (multiplied when negative); "
        "none unless given (Ollama's own default is 1.1)",
    )
    repeat_last_n: StrictInt | None = Field(None, ge=-1, le=8192, description="generated tokens it looks back "
                                            "over: 64 unless given; 0 none, -1 all")
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    top_k: StrictInt | None = Field(None, ge=0, le=100_000, description="sample among the k most likely; 0: all")
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                description="sample among tokens at least this share of the most likely one's chance")

    def generation_params(self, defaults: GenerationParams) -> GenerationParams:
        """Ollama's options over the server's defaults. Ollama has no refusal for a long `num_predict` (-1 even
        means "no limit"), so it is capped at MAX_NEW_TOKENS; `done_reason: "length"` tells a cut answer."""
        limit = defaults.max_new_tokens
        wanted = self.num_predict if self.num_predict is not None and self.num_predict > 0 else limit
        if any(not text for text in self.stop or []):
            raise BadRequestError("options.stop: stop strings must not be empty")
        return GenerationParams(
            max_new_tokens=min(wanted, limit),
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            penalties=Penalties(
                presence=self.presence_penalty or 0.0, frequency=self.frequency_penalty or 0.0,
                repetition=self.repeat_penalty or 1.0, last_n=64 if self.repeat_last_n is None else self.repeat_last_n,
            ),
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
        )


class GenerationFields(RequestModel):
    """What /api/chat and /api/generate share."""

    model: StrictStr = Field(..., min_length=1, description="a name from /api/tags; `:latest` optional, `:rag` for RAG")
    stream: StrictBool = Field(True, description="true: NDJSON pieces, then a last object with `done: true`")
    options: OllamaOptions | None = None
    keep_alive: StrictStr | float | None = Field(None, description="accepted; models stay loaded here")
    format: StrictStr | dict[str, Any] | None = Field(
        None, description='"json": the reply is a JSON object; a JSON Schema object: JSON valid for it'
    )
    think: StrictBool | StrictStr | None = Field(None, description="only false")
    logprobs: StrictBool | None = Field(None, description="true: each token's log-probability, in the last object")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20, description="with logprobs: the likeliest others too")

    def refuse_unsupported(self, model_name: str, **more: object) -> None:
        """400 in Ollama's words for the first field asking for what this server cannot do."""
        problems = {"think": self.think, **more}
        for field, value in problems.items():
            if value:
                raise BadRequestError(f'"{model_name}" does not support {field}')

    def params(self, defaults: GenerationParams) -> GenerationParams:
        params = (self.options or OllamaOptions.model_validate({})).generation_params(defaults)
        return replace(params, constraint=self.constraint(),
                       logprobs=(self.top_logprobs or 0) if self.logprobs else None)

    def constraint(self) -> OutputConstraint | None:
        """Ollama's `format`: "" or absent free text, "json" any JSON object, an object a JSON Schema."""
        if isinstance(self.format, dict):
            return json_constraint(self.format, "format")
        if self.format == "json":
            return OutputConstraint("json_object")
        if self.format:
            raise BadRequestError(f'format must be "json" or a JSON Schema object, not {self.format!r}')
        return None

    @property
    def rag_option(self) -> bool:
        return bool(self.options and self.options.rag)

    @property
    def load_only(self) -> bool:
        """Nothing to answer: Ollama's way of asking to load the model."""
        raise NotImplementedError


class OllamaFunctionCall(RequestModel):
    name: StrictStr = Field(..., min_length=1, max_length=64)
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(RequestModel):
    """A call, as Ollama writes it: no id, the arguments an object."""

    function: OllamaFunctionCall

    @classmethod
    def of(cls, call: ToolCall) -> OllamaToolCall:
        return cls(function=OllamaFunctionCall(name=call.name, arguments=json.loads(call.arguments)))


class OllamaMessage(RequestModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr = ""
    images: list[StrictStr] | None = Field(None, description="not supported")
    tool_calls: list[OllamaToolCall] | None = Field(None, description="an assistant message: the calls it made")
    tool_name: StrictStr | None = Field(None, description="a tool message: the tool it is the result of")
    thinking: StrictStr | None = Field(None, description="accepted in the history; not shown to the model")


class OllamaChatRequest(GenerationFields):
    messages: list[OllamaMessage] = Field(
        default_factory=list, description="empty: only load the model", examples=[[{"role": "user", "content": "Hi"}]]
    )
    tools: list[ToolParam] | None = Field(
        None, description="functions the model may call; it chooses (Ollama has no tool_choice)"
    )

    @property
    def load_only(self) -> bool:
        return not self.messages

    def params(self, defaults: GenerationParams) -> GenerationParams:
        tools = offered_tools(self.tools)
        return replace(super().params(defaults), tools=ToolUse(tools) if tools else None)

    def chat_messages(self, model_name: str) -> list[ChatMessage]:
        self.refuse_unsupported(model_name)
        messages: list[ChatMessage] = []
        for message in self.messages:
            if message.images:
                raise BadRequestError(f'"{model_name}" does not support images')
            shown: ChatMessage = {"role": message.role, "content": message.content}
            if message.tool_calls:
                # Ollama's calls have no ids; the conversation only needs each call's name and arguments.
                shown["tool_calls"] = tuple(ToolCall(f"call_{number}", call.function.name,
                                                     json.dumps(call.function.arguments, ensure_ascii=False))
                                            for number, call in enumerate(message.tool_calls))
            messages.append(shown)
        return messages


class OllamaGenerateRequest(GenerationFields):
    prompt: StrictStr = Field("", description="empty: only load the model")
    system: StrictStr | None = None
    suffix: StrictStr | None = Field(None, description="not supported")
    template: StrictStr | None = Field(None, description="not supported")
    raw: StrictBool | None = Field(None, description="only false")
    images: list[StrictStr] | None = Field(None, description="not supported")
    context: list[int] | None = Field(None, description="accepted and ignored: this server returns none")

    @property
    def load_only(self) -> bool:
        return not self.prompt

    def chat_messages(self, model_name: str) -> list[ChatMessage]:
        self.refuse_unsupported(model_name, suffix=self.suffix, template=self.template, raw=self.raw,
                                images=self.images)
        system: list[ChatMessage] = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.prompt}]


class OllamaShowRequest(RequestModel):
    model: StrictStr | None = Field(None, min_length=1)
    name: StrictStr | None = Field(None, min_length=1, description="older clients' name for `model`")
    verbose: StrictBool | None = None


class OllamaEmbedRequest(RequestModel):
    model: StrictStr = Field(..., min_length=1, description="the embedding model's name (see /api/tags)")
    input: StrictStr | list[StrictStr] = Field("", max_length=256, description="one text or a list of texts")
    truncate: StrictBool | None = None
    options: dict[str, Any] | None = None
    keep_alive: StrictStr | float | None = None
    dimensions: StrictInt | None = Field(None, ge=1, description="keep only the first this many dimensions")

    @property
    def texts(self) -> list[str]:
        # Ollama embeds nothing for an empty string rather than refusing it.
        return [self.input] if isinstance(self.input, str) and self.input else list(self.input or [])


class ModelDetails(BaseModel):
    parent_model: str = Field(..., description="adapters: the base model; the base model: empty")
    format: str = "safetensors"
    family: str = ""
    families: list[str] = Field(default_factory=list)
    parameter_size: str = ""
    quantization_level: str = ""


class ModelEntry(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int = Field(default=0, description="not known here: 0")
    digest: str = Field(..., description="sha256 of the name (stable, not of the weights)")
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[ModelEntry]


class RunningModel(ModelEntry):
    expires_at: str
    size_vram: int = 0


class PsResponse(BaseModel):
    models: list[RunningModel]


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(BaseModel):
    version: str


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int = 0
    prompt_eval_count: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[OllamaToolCall] | None = Field(default=None, exclude_if=lambda value: value is None)


class OllamaTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(..., description="the token's exact UTF-8 bytes (a token may hold part of a character)")


class OllamaLogprob(OllamaTokenLogprob):
    top_logprobs: list[OllamaTokenLogprob]

    @classmethod
    def all_of(cls, logprobs: tuple[TokenLogprob, ...] | None) -> list[OllamaLogprob] | None:
        def one(choice: TokenChoice) -> OllamaTokenLogprob:
            return OllamaTokenLogprob(token=choice.token, logprob=choice.logprob, bytes=list(choice.token_bytes))

        if logprobs is None:
            return None
        return [cls(**one(entry.chosen).model_dump(), top_logprobs=[one(top) for top in entry.top])
                for entry in logprobs]


class GenerationStats(BaseModel):
    """A generation's last object (`done: true`); when not streaming, the whole answer. Durations in ns."""

    model: str
    created_at: str
    done: bool = True
    done_reason: Literal["stop", "length", "load"]
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    logprobs: list[OllamaLogprob] | None = Field(default=None, exclude_if=lambda value: value is None,
                                                 description="with logprobs: every generated token's")


class ChatResponse(GenerationStats):
    message: AssistantMessage


class GenerateResponse(GenerationStats):
    response: str


class ChatChunk(BaseModel):
    model: str
    created_at: str
    message: AssistantMessage
    done: Literal[False] = False


class GenerateChunk(BaseModel):
    model: str
    created_at: str
    response: str
    done: Literal[False] = False
