"""Request and response models of the classification API (/api/v1/inference)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictInt, StrictStr

from app.api.schemas import RequestModel


class LoadModelRequest(RequestModel):
    model_dir: StrictStr = Field(
        ..., min_length=1, max_length=128, description="a classifier folder's name under CLASSIFIER_MODELS_PATH"
    )
    max_length: StrictInt = Field(512, ge=1, description="inputs are cut to this many tokens")


class UnloadModelRequest(RequestModel):
    model_id: StrictStr = Field(..., min_length=1, max_length=128)


class ModelStatusResponse(BaseModel):
    model_id: str
    status: Literal["loaded", "unloaded"]
    message: str


class PredictRequest(RequestModel):
    model_id: StrictStr = Field(..., min_length=1, max_length=128)
    texts: list[StrictStr] = Field(..., min_length=1, description="at most MAX_PREDICT_TEXTS texts")
    top_n: StrictInt = Field(3, ge=1, description="labels per text in `top_n`; above the label count: all")
    batch_size: StrictInt = Field(16, ge=1, le=256, description="texts per forward pass")


class PredictResponse(BaseModel):
    model_id: str
    labels: list[str] = Field(..., description="the most probable label of each text")
    top_n: list[list[tuple[str, float]]] = Field(..., description="per text: [label, probability], most probable first")
    label_probabilities: list[dict[str, float]] = Field(
        ..., description="per text: every label's probability (a softmax over all labels: they sum to 1)"
    )


class ModelInfo(BaseModel):
    model_id: str
    status: Literal["loaded", "unloaded"]
    gpu_id: int | None = Field(..., description="the CUDA device it runs on; null on the CPU or when unloaded")
    uptime_seconds: float | None = Field(..., description="seconds since it was loaded; null when unloaded")


class ModelListResponse(BaseModel):
    models: list[ModelInfo]
    total: int
    loaded_count: int


class QueryModelsRequest(RequestModel):
    model_ids: list[StrictStr] = Field(..., min_length=1, max_length=1000)


class WorkerStatus(BaseModel):
    worker_id: str = Field(
        ..., description='the device and the worker on it, as seed 004 writes it: "cpu-0", "cuda0-0"'
    )
    device: str = Field(..., description="cpu, cuda or cuda:N: where the model and its engine thread run")
    total_memory_mb: float = Field(..., description="CUDA: the device's memory; CPU: the machine's")
    used_memory_mb: float
    free_memory_mb: float = Field(..., description="CUDA: free on the device; CPU: the machine's available memory")
    memory_usage_percent: float
    process_rss_mb: float | None = Field(None, description="CPU: the server process's resident memory")
    process_allocated_mb: float | None = Field(None, description="CUDA: tensors this process holds on the device")


class ServiceStatusResponse(BaseModel):
    service_status: Literal["running", "starting", "error"]
    workers: list[WorkerStatus]
    total_workers: int
    loaded_models_count: int
    pending_requests: int = Field(..., description="prediction requests queued or running on the engine now")
