"""Request and response models of the OpenAI-compatible API (`/v1/chat/completions`, `/v1/models`).

The responses follow the types of the official `openai` package field for field
(`openai/types/chat/chat_completion.py`, `chat_completion_chunk.py`, `model.py`), so its client and
LangChain's `ChatOpenAI` read them as they read OpenAI's. Our additions: the adapter fields of `/ask`,
`rag` in the request and `sources` in the answer.

Fields the official clients may send and that change nothing here are accepted and ignored; fields asking
for something this server cannot do (audio, logit biases, predicted outputs) are refused
with 400 `unsupported_parameter` rather than silently dropped. Unknown fields are refused with 422.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from app.api.schemas import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOOLS,
    AdapterFields,
    RequestModel,
    ResponseFormat,
    Seed,
    SourceDocument,
    ToolParam,
    offered_tools,
)
from app.errors import BadRequestError, NotFoundError
from app.llm.base import (
    AdapterSpec,
    ChatMessage,
    GenerationParams,
    Penalties,
    TokenChoice,
    TokenLogprob,
    ToolCall,
    ToolUse,
)
from app.rag.collections import DEFAULT_COLLECTION
from app.rag.service import is_blank

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_CHOICES = 8  # `n`: rows of one request in one batch
_ROLES: dict[str, Literal["system", "user", "assistant", "tool"]] = {
    "system": "system",
    "developer": "system",  # what OpenAI's newer clients call the system message
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}



class UnsupportedParameterError(BadRequestError):
    """The request asks for an OpenAI feature this server does not provide."""

    code = "unsupported_parameter"


class ModelNotFoundError(NotFoundError):
    """`model` names neither the base model nor a known adapter."""

    code = "model_not_found"


def _omit_none(value: object) -> bool:
    return value is None


class ContentPart(RequestModel):
    """One part of a message's content; only `{"type": "text", "text": ...}` is served."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None


class FunctionCallParam(RequestModel):
    name: StrictStr = Field(..., min_length=1, max_length=64)
    arguments: StrictStr = Field(..., description="the arguments, a JSON object as text")


class ToolCallParam(RequestModel):
    """A call an earlier assistant message made, as the client sends it back."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallParam

    def to_tool_call(self, where: str) -> ToolCall:
        try:
            arguments = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise BadRequestError(f"{where}.function.arguments is not a JSON object")
        return ToolCall(self.id, self.function.name, self.function.arguments)


class ChatCompletionMessageParam(RequestModel):
    """A message of the conversation, as the OpenAI API takes it."""

    model_config = ConfigDict(extra="forbid")

    role: StrictStr = Field(..., description="system (or developer), user, assistant or tool")
    content: StrictStr | list[ContentPart] | None = Field(
        None, description='a string, or a list of `{"type": "text", "text": ...}` parts'
    )
    name: StrictStr | None = Field(None, description="accepted and ignored")
    tool_calls: list[ToolCallParam] | None = Field(None, description="an assistant message: the calls it made")
    function_call: dict[str, Any] | None = Field(None, description="not supported (the older form of tool_calls)")
    tool_call_id: StrictStr | None = Field(None, max_length=256, description="a tool message: the call it answers")
    refusal: StrictStr | None = Field(None, description="accepted and ignored")

    def to_chat_message(self, where: str) -> ChatMessage:
        role = _ROLES.get(self.role)
        if role is None:
            raise UnsupportedParameterError(
                f"{where}.role is {self.role!r}; only system, developer, user, assistant and tool messages are "
                "accepted"
            )
        if self.function_call is not None:
            raise UnsupportedParameterError(f"{where}: function_call is not supported; send tool_calls")
        if self.tool_calls and role != "assistant":
            raise BadRequestError(f"{where}: only assistant messages carry tool_calls")
        if role == "tool" and not self.tool_call_id:
            raise BadRequestError(f"{where}: a tool message needs the tool_call_id of the call it answers")
        message = self._text_message(role, where)
        if self.tool_calls:
            message["tool_calls"] = tuple(call.to_tool_call(f"{where}.tool_calls[{number}]")
                                          for number, call in enumerate(self.tool_calls))
        if role == "tool" and self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message

    def _text_message(self, role: Literal["system", "user", "assistant", "tool"], where: str) -> ChatMessage:
        if self.content is None:
            if role != "assistant":
                raise BadRequestError(f"{where}.content is missing; only assistant messages may leave it out")
            return {"role": role, "content": ""}
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        texts = []
        for number, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise UnsupportedParameterError(
                    f'{where}.content[{number}] is a {part.type!r} part; only {{"type": "text", "text": ...}} '
                    "parts are supported (this model reads text only)"
                )
            texts.append(part.text)
        return {"role": role, "content": "\n".join(texts)}


class NamedFunction(RequestModel):
    name: StrictStr


class NamedToolChoice(RequestModel):
    """`{"type": "function", "function": {"name": ...}}`: that function must be called."""

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(RequestModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = Field(False, description="true: a last chunk carries the token counts")
    include_obfuscation: StrictBool | None = Field(None, description="accepted and ignored")


class ChatCompletionRequest(AdapterFields):
    """A chat completion request as OpenAI's API takes it, plus `rag` and the adapter fields.

    `model` is the base model's name (the base model alone) or an adapter's name (see `GET /v1/models`).
    `adapter` / `adapter_id` / `lora_adapter_ids` / `adapters`, when given, choose the adapters instead
    and `model` must still be a model served here (the base model or an adapter).
    """

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(
        ..., min_length=1, description="the base model's name or an adapter's name", examples=["SmolLM2-135M-Instruct"]
    )
    messages: list[ChatCompletionMessageParam] = Field(
        ..., min_length=1, examples=[[{"role": "user", "content": "Name three fruits."}]]
    )
    temperature: StrictFloat | None = Field(
        None, ge=0, le=2, allow_inf_nan=False, description="0: greedy; omitted: the server's TEMPERATURE"
    )
    top_p: StrictFloat | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="omitted: the server's TOP_P")
    max_tokens: StrictInt | None = Field(None, ge=1, description="at most the server's MAX_NEW_TOKENS (the default)")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="same as max_tokens; wins when both given")
    stop: StrictStr | list[StrictStr] | None = Field(None, description=f"up to {MAX_STOP_SEQUENCES} stop strings")
    stream: StrictBool | None = Field(False, description="true: Server-Sent Events chunks ending with `data: [DONE]`")
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(None, ge=1, le=MAX_CHOICES, description=f"answers to generate, 1 to {MAX_CHOICES}; "
                                "more than one: streamed once all are complete")
    seed: Seed | None = Field(
        None, description="a 64-bit integer: the same seed and request give the same sampled answer again"
    )
    rag: StrictBool = Field(
        False, description="true: answer from the indexed documents and return the passages used as `sources`"
    )
    collection: StrictStr = Field(
        DEFAULT_COLLECTION, max_length=64, description="with rag: true, the document set to answer from"
    )

    presence_penalty: float | None = Field(
        None, ge=-2, le=2, allow_inf_nan=False,
        description="lowers the score of every token already generated by this much, once",
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, allow_inf_nan=False,
        description="lowers the score of every token already generated by this much for each time it was",
    )
    # vLLM's sampling extensions (in the openai client's `extra_body`).
    response_format: ResponseFormat | None = Field(
        None, description='{"type": "json_object"} or {"type": "json_schema", ...}: the reply is JSON (for the schema)'
    )
    top_k: StrictInt | None = Field(None, ge=-1, le=100_000, description="sample among the k most likely; 0 or -1: all")
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                description="sample among tokens at least this share of the most likely one's chance")

    # Accepted; they change nothing here (or only their neutral value is accepted).
    user: StrictStr | None = None
    logprobs: StrictBool | None = Field(None, description="true: each token's log-probability in choices[].logprobs")
    top_logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: this many likeliest tokens at each place too"
    )
    logit_bias: dict[str, float] | None = Field(None, description="only empty")
    parallel_tool_calls: StrictBool | None = Field(None, description="false: at most one tool call in a reply")
    store: StrictBool | None = None
    metadata: dict[str, str] | None = None
    service_tier: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None

    tools: list[ToolParam] | None = Field(None, description=f"functions the model may call, at most {MAX_TOOLS}")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"auto" (the default with tools): the model chooses; "required": it calls one or more; '
        '{"type": "function", "function": {"name": ...}}: it calls that one; "none": it answers in text'
    )

    # Refused unless absent, empty or neutral: this server cannot honour them.
    functions: list[dict[str, Any]] | None = Field(None, description="not supported")
    function_call: StrictStr | dict[str, Any] | None = Field(None, description='only "none"')
    modalities: list[StrictStr] | None = Field(None, description='only ["text"]')
    audio: dict[str, Any] | None = Field(None, description="not supported")
    prediction: dict[str, Any] | None = Field(None, description="not supported")
    web_search_options: dict[str, Any] | None = Field(None, description="not supported")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop strings")
        if any(len(text) > MAX_STOP_CHARS for text in stops):
            raise ValueError(f"stop strings of at most {MAX_STOP_CHARS} characters")
        if any(not text for text in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    def refuse_unsupported(self) -> None:
        """Raise `UnsupportedParameterError` naming the first field asking for what this server cannot do."""
        problems = {
            "functions": bool(self.functions) and "functions are not supported: this server does not call functions",
            "function_call": self.function_call not in (None, "none") and 'function_call: only "none" is supported',
            "logit_bias": bool(self.logit_bias) and "logit_bias is not supported",
            "modalities": self.modalities not in (None, [], ["text"]) and 'modalities: only ["text"] is supported',
            "audio": self.audio is not None and "audio output is not supported",
            "prediction": self.prediction is not None and "prediction (predicted outputs) is not supported",
            "web_search_options": self.web_search_options is not None and "web search is not supported",
        }
        for message in problems.values():
            if message:
                raise UnsupportedParameterError(message)

    def chat_messages(self) -> list[ChatMessage]:
        messages = [message.to_chat_message(f"messages[{n}]") for n, message in enumerate(self.messages)]
        if self.rag and not any(m["role"] == "user" and not is_blank(m["content"]) for m in messages):
            raise BadRequestError("rag: true needs a user message with text to search the documents with")
        return messages

    def generation_params(self, defaults: GenerationParams) -> GenerationParams:
        """The sampling settings: the request's, else the server's; `max_tokens` may not exceed the server's."""
        limit = defaults.max_new_tokens
        max_tokens = self.max_completion_tokens or self.max_tokens or limit
        if max_tokens > limit:
            field = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
            raise BadRequestError(
                f"{field}={max_tokens} is more than this server generates: at most {limit} (MAX_NEW_TOKENS)"
            )
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return GenerationParams(
            max_new_tokens=max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            stop=tuple(stop),
            seed=self.seed,
            penalties=Penalties(presence=self.presence_penalty or 0.0, frequency=self.frequency_penalty or 0.0),
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            constraint=self.response_format.constraint() if self.response_format else None,
            tools=self.tool_use(),
            logprobs=self._logprobs(),
        )

    def _logprobs(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise BadRequestError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_use(self) -> ToolUse | None:
        """The tools the model is shown and how it may use them; None without tools or with tool_choice "none"."""
        tools = offered_tools(self.tools)
        choice = self.tool_choice or "auto"
        if not tools:
            if choice not in ("auto", "none"):
                raise BadRequestError("tool_choice asks for a tool call, but the request has no tools")
            return None
        if choice == "none":
            return None
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {tool.name for tool in tools}:
                known = ", ".join(tool.name for tool in tools)
                raise BadRequestError(f"tool_choice names {choice.function.name!r}, which is not among the tools "
                                      f"({known})")
            return ToolUse(tools, "named", choice.function.name, parallel=self.parallel_tool_calls is not False)
        return ToolUse(tools, choice, parallel=self.parallel_tool_calls is not False)

    def adapter_choice(self, base_name: str, adapter_names: list[str]) -> AdapterSpec:
        """The adapter fields when given, else what `model` names: the base model alone or one adapter. A `model`
        served nowhere here is 404 either way: a request meant for another base model is never answered by this
        one under the adapter fields."""
        if self.model != base_name and self.model not in adapter_names:
            available = ", ".join([base_name, *adapter_names])
            raise ModelNotFoundError(
                f"model {self.model!r} is not served here; available: {available} (GET /v1/models)"
            )
        spec = self.adapter_spec()
        if spec is not None:
            return spec
        return () if self.model == base_name else ((self.model, 1.0),)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(..., description="the arguments, a JSON object as text")


class ChatCompletionMessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    @classmethod
    def of(cls, call: ToolCall) -> ChatCompletionMessageToolCall:
        return cls(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(..., description="the answer; null when the reply is only tool calls")
    tool_calls: list[ChatCompletionMessageToolCall] | None = Field(default=None, exclude_if=_omit_none)


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


OpenAIFinishReason = Literal["stop", "length", "tool_calls"]
NOTICE_DESCRIPTION = "only when the answer is blank: a sentence saying so (in the last chunk when streaming)"


class TopLogprob(BaseModel):
    token: str
    bytes: list[int] = Field(..., description="the token's exact UTF-8 bytes (a token may hold part of a character)")
    logprob: float

    @classmethod
    def of(cls, choice: TokenChoice) -> TopLogprob:
        return cls(token=choice.token, bytes=list(choice.token_bytes), logprob=choice.logprob)


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, logprobs: tuple[TokenLogprob, ...] | None) -> ChoiceLogprobs | None:
        if logprobs is None:
            return None
        return cls(content=[ChatCompletionTokenLogprob(**TopLogprob.of(entry.chosen).model_dump(),
                                                       top_logprobs=[TopLogprob.of(top) for top in entry.top])
                            for entry in logprobs])


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: OpenAIFinishReason


class ChatCompletionResponse(BaseModel):
    """A chat completion as OpenAI's API returns it; `sources` only with `rag: true`."""

    id: str = Field(..., description="chatcmpl-...")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(..., description="Unix time in seconds")
    model: str = Field(..., description="the `model` of the request")
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage
    sources: list[SourceDocument] | None = Field(
        default=None, exclude_if=_omit_none, description="with rag: true, the passages the answer was given from"
    )
    notice: str | None = Field(default=None, exclude_if=_omit_none, description=NOTICE_DESCRIPTION)


class ChoiceDeltaFunctionCall(BaseModel):
    name: str | None = Field(default=None, exclude_if=_omit_none)
    arguments: str = ""


class ChoiceDeltaToolCall(BaseModel):
    """A streamed piece of the `index`th call: its id, type and name first, then its arguments."""

    index: int
    id: str | None = Field(default=None, exclude_if=_omit_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_omit_none)
    function: ChoiceDeltaFunctionCall


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_omit_none)
    content: str | None = Field(default=None, exclude_if=_omit_none)
    tool_calls: list[ChoiceDeltaToolCall] | None = Field(default=None, exclude_if=_omit_none)


class ChatCompletionChunkChoice(BaseModel):
    index: int = 0
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = Field(default=None, description="with logprobs: every token's, in the last chunk")
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: CompletionUsage | None = Field(default=None, exclude_if=_omit_none)
    sources: list[SourceDocument] | None = Field(default=None, exclude_if=_omit_none)
    notice: str | None = Field(default=None, exclude_if=_omit_none, description=NOTICE_DESCRIPTION)


class ModelCard(BaseModel):
    """A model as OpenAI's API lists it, with vLLM's `root` and `parent` (adapters: `parent` = base)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lora-rag"
    root: str = Field(..., description="the base model")
    parent: str | None = Field(..., description="null for the base model; the base model for an adapter")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


#: OpenAI's own limit on inputs per embeddings request; the body limit (MAX_BODY_BYTES) bounds their total size.
MAX_EMBEDDING_INPUTS = 2048
EncodingFormat = Literal["float", "base64"]


class EmbeddingRequest(RequestModel):
    """An embeddings request as OpenAI's API takes it; the vectors come from the embedder the documents are
    searched with. Token-id arrays (which OpenAI also takes) are refused: this server embeds text."""

    model_config = ConfigDict(extra="forbid")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        ..., description=f"one text or a list of up to {MAX_EMBEDDING_INPUTS} texts", examples=[["a cat", "un chat"]]
    )
    model: StrictStr = Field(..., min_length=1, description="EMBEDDING_MODEL, with or without its `embedded:` prefix")
    encoding_format: EncodingFormat = Field(
        "float", description="base64: each vector as little-endian float32 bytes, base64-encoded"
    )
    dimensions: StrictInt | None = Field(None, ge=1, description="keep only the first this many dimensions")
    user: StrictStr | None = Field(None, description="accepted and ignored")

    def texts(self) -> list[str]:
        """The texts to embed; `BadRequestError` for token ids, an empty list or an empty text (as OpenAI)."""
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts:
            raise BadRequestError("input must not be empty")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise BadRequestError(f"input has {len(texts)} entries; the limit is {MAX_EMBEDDING_INPUTS}")
        strings = [text for text in texts if isinstance(text, str)]
        if len(strings) != len(texts):
            raise UnsupportedParameterError("input as token ids is not supported: send the text itself")
        if any(not text for text in strings):
            raise BadRequestError("input must not contain empty strings")
        return strings


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(..., description="floats, or a base64 string with encoding_format=base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(..., description="whitespace-separated words of the input (no tokenizer counts here)")
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str = Field(..., description="the `model` of the request")
    usage: EmbeddingUsage
