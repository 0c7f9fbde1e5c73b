"""Request and response models of the HTTP API (they are the OpenAPI schema users see)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr


class AskRequest(BaseModel):
    query: StrictStr = Field(..., description="the question, in any language", examples=["How do I switch models?"])
    use_lora: StrictBool | None = Field(
        None, description="true: the LoRA model, false: Ollama, for this request only; omitted: the active backend"
    )


class SourceDocument(BaseModel):
    content: str
    metadata: dict[str, Any]
    score: float = Field(..., description="cosine similarity of the chunk to the query (higher is closer)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class AskResponse(BaseModel):
    answer: str
    source_documents: list[SourceDocument]
    model_used: Literal["lora", "base", "ollama"]
    processing_time: float = Field(..., description="seconds")
    usage: Usage


class SwitchModelRequest(BaseModel):
    use_lora: StrictBool = Field(..., description="true: LoRA (local model), false: Ollama")


class SwitchModelResponse(BaseModel):
    using_lora: bool
    active_backend: Literal["lora", "ollama"]
    message: str


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    base_model: str
    lora_model_path: str
    lora_exists: bool
    using_lora: bool
    cache_dir: str | None
    vector_store_path: str
    embedding_model: str
    device: str
    quantization: str
    ollama_model: str


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]
    components: dict[str, Literal["healthy", "unhealthy"]]
    details: dict[str, Any]


class LivenessResponse(BaseModel):
    status: Literal["alive"]


class ReadinessResponse(BaseModel):
    ready: bool
    status: Literal["healthy", "degraded", "unhealthy"]


class ErrorResponse(BaseModel):
    error: str = Field(..., description="stable machine-readable code")
    message: str = Field(..., description="what went wrong and what to do")
