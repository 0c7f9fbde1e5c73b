"""Request and response models of the HTTP API (they are the OpenAPI schema users see)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from app.api.errors import OURS, Envelope
from app.errors import BadRequestError, ValidationFailedError
from app.llm.base import (
    SEED_MAX,
    SEED_MIN,
    AdapterSpec,
    FinishReason,
    ModelUsed,
    OutputConstraint,
    Tool,
    canonical_json,
)
from app.rag.collections import DEFAULT_COLLECTION
from app.rag.vector_store import ScoreKind, SearchHit

BASE_ADAPTER = "__base__"
#: The longest JSON schema a request may hold the reply to, as compact JSON: a schema is compiled into a grammar on
#: the server, and OpenAI's own limit (100 properties, 5 levels) fits in a few kilobytes.
MAX_SCHEMA_CHARS = 65_536
#: OpenAI's limit on the tools of one request.
MAX_TOOLS = 128
#: Stop strings of one request (OpenAI takes 4, vLLM any number), and the longest one: each is looked for at every
#: generated token.
MAX_STOP_SEQUENCES, MAX_STOP_CHARS = 16, 256
#: A sampling seed as every protocol here takes it: a 64-bit integer (a larger one is a 422/400 naming the field).
Seed = Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)]


def _invalid_text_at(value: object, where: str = "") -> str | None:
    """Where in `value` (inside lists, dict keys and values too) a string is not valid Unicode text: "" for
    `value` itself, None for nowhere. JSON may escape a lone surrogate ("\\ud800"), which no UTF-8 text
    holds; the tokenizer, the embedder and the logs cannot take it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, list):
        parts = [(f"{where}[{n}]", item) for n, item in enumerate(value)]
    elif isinstance(value, dict):
        parts = [(f"{where}[{key!r}]", part) for key, item in value.items() for part in (key, item)]
    else:
        return None  # numbers, booleans, and nested request models, which check their own fields
    return next((at for path, item in parts if (at := _invalid_text_at(item, path)) is not None), None)


class RequestModel(BaseModel):
    """Base of every request body model and of the models nested in one: every string in every field, inside
    lists and dicts too, must be valid Unicode text, else 422 naming the field."""

    @field_validator("*")
    @classmethod
    def _unicode_text(cls, value: object) -> object:
        where = _invalid_text_at(value)
        if where is not None:
            at = f" at {where}" if where else ""
            raise ValueError(f"not valid Unicode text{at}: it holds a lone surrogate (U+D800 to U+DFFF)")
        return value


def json_constraint(schema: dict[str, Any] | None, field: str) -> OutputConstraint:
    """The reply held to JSON valid for `schema` (None: any JSON object); a schema over MAX_SCHEMA_CHARS is a 400
    naming `field`. Whether the schema compiles is checked where it is compiled: by the engine, before generating."""
    if schema is None:
        return OutputConstraint("json_object")
    constraint = OutputConstraint.json_schema(schema)
    if len(constraint.schema) > MAX_SCHEMA_CHARS:
        raise BadRequestError(f"{field} is {len(constraint.schema)} characters of JSON; at most {MAX_SCHEMA_CHARS}")
    return constraint


class JsonSchemaFormat(RequestModel):
    """OpenAI's `response_format.json_schema`: the schema the reply must be valid for, and its name."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: StrictStr = Field("response", max_length=64, description="the schema's name (a-z, A-Z, 0-9, _ and -)")
    description: StrictStr | None = Field(None, description="what the reply is for (not shown to the model here)")
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="a JSON Schema object; absent: any JSON object"
    )
    strict: StrictBool | None = Field(None, description="accepted: the reply always follows the schema here")


class ResponseFormat(RequestModel):
    """What the reply must be (OpenAI's `response_format`): `{"type": "text"}` (free text, the default),
    `{"type": "json_object"}` (any JSON object) or `{"type": "json_schema", "json_schema": {"name": ..., "schema":
    {...}, "strict": true}}` (JSON valid for the schema). The local model is held to it token by token."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description='with type "json_schema": the schema')

    def constraint(self) -> OutputConstraint | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return OutputConstraint("json_object")
        if self.json_schema is None:
            raise BadRequestError('response_format of type "json_schema" needs "json_schema": {"name": ..., '
                                  '"schema": {...}}')
        return json_constraint(self.json_schema.schema_, "response_format.json_schema.schema")


class FunctionDefinition(RequestModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$", description="a-z, A-Z, 0-9, _ and -, at most 64")
    description: StrictStr | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema object; absent: no parameters")
    strict: StrictBool | None = Field(None, description="accepted: a forced call always follows the schema here")


class ToolParam(RequestModel):
    """A tool the model may call, as OpenAI's API and Ollama's take it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition

    def to_tool(self, where: str) -> Tool:
        parameters = canonical_json(self.function.parameters or {"type": "object", "properties": {}})
        if len(parameters) > MAX_SCHEMA_CHARS:
            raise BadRequestError(f"{where}.function.parameters is {len(parameters)} characters of JSON; at most "
                                  f"{MAX_SCHEMA_CHARS}")
        return Tool(self.function.name, self.function.description or "", parameters)


def offered_tools(tools: list[ToolParam] | None) -> tuple[Tool, ...]:
    """A request's tools: at most MAX_TOOLS, names unique (else 400)."""
    if len(tools or []) > MAX_TOOLS:
        raise BadRequestError(f"{len(tools or [])} tools; at most {MAX_TOOLS}")
    offered = tuple(tool.to_tool(f"tools[{number}]") for number, tool in enumerate(tools or []))
    if len({tool.name for tool in offered}) < len(offered):
        raise BadRequestError("tools: two tools have the same name")
    return offered


class OwnRequestModel(RequestModel):
    """The body of one of our own routes (/ask, /switch_model, the admin routes): a field it does not know is a
    422 naming it, so what another system's request carries (seed 002's "precision" and "device") is never
    silently ignored. The /v1 and /api bodies keep their protocols' rules instead."""

    model_config = ConfigDict(extra="forbid")


class AdapterWeight(RequestModel):
    name: StrictStr = Field(..., min_length=1, max_length=64)
    weight: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False)


class AdapterFields(RequestModel):
    """The ways a request can pick LoRA adapters (ours, and those of the proxies users come from)."""

    adapter: StrictStr | None = Field(
        None, description='an adapter name; null or "__base__": the base model alone; omitted: the server default'
    )
    adapter_id: StrictStr | None = Field(None, description="same as `adapter` (LoRAX style)")
    lora_adapter_ids: list[StrictStr] | None = Field(
        None, max_length=8, description="one adapter, or several combined with equal weights"
    )
    adapters: list[AdapterWeight] | None = Field(
        None,
        max_length=8,
        description='weighted mix, e.g. [{"name": "sql", "weight": 0.7}, {"name": "code", "weight": 0.3}]',
    )

    @model_validator(mode="after")
    def _one_way_only(self) -> AdapterFields:
        ways = ("adapter", "adapter_id", "lora_adapter_ids", "adapters")
        given = [name for name in ways if name in self.model_fields_set]
        if len(given) > 1:
            raise ValueError(f"give only one of {', '.join(given)}")
        return self

    def adapter_spec(self) -> AdapterSpec | None:
        """None: the server default; (): the base model; else (name, weight) pairs."""
        fields = self.model_fields_set
        if "adapters" in fields and self.adapters is not None:
            pairs = [(a.name, a.weight) for a in self.adapters]
        elif "lora_adapter_ids" in fields and self.lora_adapter_ids is not None:
            pairs = [(name, 1.0 / len(self.lora_adapter_ids)) for name in self.lora_adapter_ids]
        elif "adapter" in fields or "adapter_id" in fields:
            name = self.adapter if "adapter" in fields else self.adapter_id
            pairs = [] if name in (None, BASE_ADAPTER) else [(name, 1.0)]
        else:
            return None
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValidationFailedError("an adapter is named twice")
        if len(pairs) == 1 and "adapters" not in fields:
            return ((pairs[0][0], 1.0),)
        return tuple(pairs)


class BackendChoice(RequestModel):
    """A backend named (`backend`) or chosen the older way (`use_lora`), for one request or a switch."""

    backend: StrictStr | None = Field(
        None, max_length=64, description="lora, ollama or remote (GET /model_info `backends`); omitted: the active one"
    )
    use_lora: StrictBool | None = Field(None, description="true: the lora backend, false: ollama (as `backend`)")

    @model_validator(mode="after")
    def _one_way_to_choose(self) -> BackendChoice:
        if self.backend is not None and self.use_lora is not None:
            raise ValueError("give backend or use_lora, not both")
        return self

    def backend_name(self) -> str | None:
        if self.use_lora is not None:
            return "lora" if self.use_lora else "ollama"
        return self.backend


class AskRequest(AdapterFields, BackendChoice, OwnRequestModel):
    query: StrictStr = Field(..., description="the question, in any language", examples=["How do I switch models?"])
    stream: StrictBool = Field(
        False, description="true: Server-Sent Events, `delta` events with the answer's pieces, then the full response"
    )
    collection: StrictStr = Field(
        DEFAULT_COLLECTION, max_length=64, description="the document set to answer from (see GET /collections)"
    )
    response_format: ResponseFormat | None = Field(
        None, description='the answer as JSON: {"type": "json_object"} or {"type": "json_schema", "json_schema": '
        '{"name": ..., "schema": {...}}}, as OpenAI\'s API takes it; absent: free text'
    )

    citations: StrictBool = Field(
        False, description="true: the answer comes with the passages' sentences it used (`citations`), each quoted "
        "word for word from the passage it names"
    )

    def constraint(self) -> OutputConstraint | None:
        if self.citations and self.response_format is not None:
            raise BadRequestError("citations and response_format cannot be combined: a cited answer is JSON of its own")
        return self.response_format.constraint() if self.response_format else None


class SourceDocument(BaseModel):
    content: str
    metadata: dict[str, Any]
    score: float = Field(..., description="how well the chunk matches the query (higher is closer); see score_kind")
    score_kind: ScoreKind = Field(
        ...,
        description="what score is, by RETRIEVAL_MODE: relative or rrf (hybrid: the fused dense and BM25 rankings, "
        "by HYBRID_FUSION), cosine (dense: cosine similarity of the embeddings), bm25 (lexical), cross_encoder "
        "(RERANKER_MODEL's relevance); scores of different kinds are not comparable",
    )

    @classmethod
    def from_hit(cls, hit: SearchHit) -> SourceDocument:
        return cls(content=hit.chunk.text, metadata=hit.chunk.metadata, score=hit.score, score_kind=hit.score_kind)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class CitationOut(BaseModel):
    source_index: int = Field(..., description="the cited passage's place in source_documents, from 1")
    quote: str = Field(..., description="one of that passage's sentences, word for word")


class AskResponse(BaseModel):
    answer: str
    source_documents: list[SourceDocument]
    model_used: ModelUsed
    adapters: str = Field("", description="the adapter (or weighted mix) that answered; empty for none")
    processing_time: float = Field(..., description="seconds")
    usage: Usage
    finish_reason: FinishReason = Field(
        ..., description="stop: the model ended its answer (or a stop string); length: the token budget ran out; "
        "repetition: the answer began repeating itself and was stopped (REPETITION_REPEATS)"
    )
    notice: str | None = Field(None, description="set when the answer is blank or was stopped for repeating itself, "
                               "saying so; null otherwise")
    citations: list[CitationOut] | None = Field(
        default=None, exclude_if=lambda value: value is None,
        description="with citations: true, the passages' sentences the answer used: source_index (from 1) is the "
        "passage's place in source_documents, quote one of its sentences word for word",
    )


class SwitchModelRequest(BackendChoice, OwnRequestModel):
    adapter: StrictStr | None = Field(
        None, min_length=1, max_length=64, description="a loaded adapter to make the default (on the lora backend)"
    )
    lora_model_path: StrictStr | None = Field(
        None, min_length=1, max_length=4096,
        description="an adapter folder to load (named after the folder, the admin load's path rules) and make the "
        "default (on the lora backend)",
    )

    @model_validator(mode="after")
    def _one_is_given(self) -> SwitchModelRequest:
        if self.backend is None and self.use_lora is None and self.adapter is None and self.lora_model_path is None:
            raise ValueError('give backend (e.g. {"backend": "remote"}), use_lora, adapter or lora_model_path')
        if self.adapter is not None and self.lora_model_path is not None:
            raise ValueError("give adapter or lora_model_path, not both")
        if (self.adapter is not None or self.lora_model_path is not None) and self.backend_name() not in (None, "lora"):
            raise ValueError("an adapter is served by the lora backend: leave backend out, or name lora")
        return self


class SwitchModelResponse(BaseModel):
    using_lora: bool
    active_backend: str = Field(..., description="the backend later requests use: lora, ollama or remote")
    default_adapter: str | None = Field(
        None, description="the adapter later requests on the lora backend use when they name none (null: the base)"
    )
    message: str


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    base_model: str
    lora_model_path: str
    lora_exists: bool
    using_lora: bool
    cache_dir: str | None
    vector_store_path: str
    vector_store_backend: str = Field(..., description="where collections live: faiss or milvus (VECTOR_STORE_BACKEND)")
    vector_store_location: str = Field(..., description="its folder, or the Milvus URI (never credentials)")
    embedding_model: str
    device: str
    quantization: str
    ollama_model: str
    active_backend: str = Field(..., description="the backend requests use when they name none")
    backends: list[str] = Field(..., description="the backends this server has: lora, ollama, and remote when set")


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]
    components: dict[str, bool] = Field(
        ..., description="whether each component can serve, as the design card writes it: rag_handler, vector_store, "
        "lora_model, ollama_service, and remote_service when REMOTE_BASE_URL is set"
    )
    component_status: dict[str, Literal["healthy", "unhealthy"]] = Field(..., description="the same, in words")
    details: dict[str, Any]


class LivenessResponse(BaseModel):
    status: Literal["alive"]


class ReadinessResponse(BaseModel):
    ready: bool
    status: Literal["healthy", "degraded", "unhealthy"]


def error_responses(
    *statuses: int, body: bool = False, admin: bool = False, envelope: Envelope = OURS
) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: the envelope's error body (`ErrorResponse` for our own routes) for `statuses`
    and for what the request guard may answer before the route runs (401 key, 429 rate limit; with `body`:
    400 invalid JSON, 413 too large, 422 invalid fields; with `admin`: 403 user key)."""
    guard = {401, 429} | ({400, 413, 422} if body else set()) | ({403} if admin else set())
    return {status: {"model": envelope.model} for status in sorted({envelope.status(s) for s in guard | set(statuses)})}


class LoadAdapterRequest(OwnRequestModel):
    lora_name: StrictStr = Field(..., min_length=1, max_length=64, description="name requests will use")
    lora_path: StrictStr = Field(
        ..., min_length=1, max_length=1024, description="folder name or path inside the allowed adapter folders"
    )


class UnloadAdapterRequest(OwnRequestModel):
    lora_name: StrictStr = Field(..., min_length=1, max_length=64)


class VllmLoadAdapterRequest(LoadAdapterRequest):
    """vLLM's /v1/load_lora_adapter body: as vLLM, fields it does not use (`load_inplace`) are ignored."""

    model_config = ConfigDict(extra="ignore")


class VllmUnloadAdapterRequest(UnloadAdapterRequest):
    model_config = ConfigDict(extra="ignore")


class RebuildRequest(OwnRequestModel):
    rebuild: StrictBool = Field(
        False, description="true: re-embed every document; false: only new and changed ones (unchanged are reused)"
    )


class RebuildResponse(BaseModel):
    version: str = Field(..., description="the vector store version now answering requests")
    added: int
    updated: int
    removed: int
    unchanged: int
    failed: dict[str, str] = Field(..., description="documents that could not be read, with the reason")
    chunks_embedded: int
    chunk_count: int
    seconds: float


class StoreVersion(BaseModel):
    version: str
    live: bool = Field(..., description="named by CURRENT on disk")
    created_at: str
    chunk_count: int | None
    embedding_model: str
    problem: str | None = Field(None, description="why the version's manifest cannot be read")


class StoreVersionsResponse(BaseModel):
    current: str | None = Field(..., description="the version CURRENT names on disk")
    serving: str | None = Field(..., description="the version answering requests")
    versions: list[StoreVersion] = Field(..., description="kept versions, oldest first")


class RollbackRequest(OwnRequestModel):
    version: StrictStr = Field(..., pattern=r"^v[0-9]{1,12}$", examples=["v000002"])


class RollbackResponse(BaseModel):
    version: str = Field(..., description="the version now live and answering requests")
    previous: str | None = Field(..., description="the version that answered before")
    chunk_count: int


class DocumentResponse(BaseModel):
    document_id: str = Field(..., description="stable for the same content under the same name in a collection")
    source: str = Field(..., description="the file name answers cite it by")
    collection: str
    chunks: int = Field(..., description="passages the document was split into")


class DocumentDeletedResponse(DocumentResponse):
    purged_versions: list[str] = Field(
        ..., description="with purge=true: the versions kept for rollback that held the document and were rewritten "
        "without it (FAISS); empty otherwise"
    )


class DocumentEntry(DocumentResponse):
    ingested_at: str = Field(..., description="when its content was indexed (ISO 8601, UTC)")


class DocumentListResponse(BaseModel):
    documents: list[DocumentEntry]


class CollectionEntry(BaseModel):
    name: str
    documents: int
    chunks: int


class CollectionsResponse(BaseModel):
    collections: list[CollectionEntry] = Field(..., description="`default` first, then the others by name")
