"""Text classification on the served base model: /api/v1/inference (load and unload need an admin key; see
app/api/security.py). Errors are ours: `{"error": code, "message": text}`, invalid fields 422 `invalid_request`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from app.api.classification_schemas import (
    LoadModelRequest,
    ModelListResponse,
    ModelStatusResponse,
    PredictRequest,
    PredictResponse,
    QueryModelsRequest,
    ServiceStatusResponse,
    UnloadModelRequest,
)
from app.api.deps import CHANGES_WHAT_IS_SERVED, get_classification_service
from app.api.disconnect import Watch
from app.api.schemas import error_responses
from app.classification.service import ClassificationService

router = APIRouter(prefix="/api/v1/inference", tags=["classification"])


Service = Annotated[ClassificationService, Depends(get_classification_service)]


@router.post("/models/load", response_model=ModelStatusResponse,
             responses=error_responses(404, 409, 503, body=True, admin=True), dependencies=CHANGES_WHAT_IS_SERVED)
async def load_model(request: LoadModelRequest, service: Service) -> ModelStatusResponse:
    """Load the classifier in the folder `model_dir` under CLASSIFIER_MODELS_PATH (its `<stem>.lora/` adapter,
    `<stem>.head.pt` head and `<stem>.head.pt.pkl` labels) onto the served base model. Its `model_id` is
    `model_dir`. Loading one that is loaded answers `loaded` again. Invalid, unsafe or mismatched files: 400/422
    naming the file, and nothing is attached."""
    model_id, message = await service.load(request.model_dir, request.max_length)
    return ModelStatusResponse(model_id=model_id, status="loaded", message=message)


@router.post("/models/unload", response_model=ModelStatusResponse,
             responses=error_responses(404, 409, 503, body=True, admin=True), dependencies=CHANGES_WHAT_IS_SERVED)
async def unload_model(request: UnloadModelRequest, service: Service) -> ModelStatusResponse:
    """Unload a classifier (its adapter and head; the base model stays). Predictions already running on it
    complete; later ones get 404 `model_not_loaded`."""
    model_id, message = await service.unload(request.model_id)
    return ModelStatusResponse(model_id=model_id, status="unloaded", message=message)


@router.post("/predict", response_model=PredictResponse, responses=error_responses(404, 503, body=True))
async def predict(request: PredictRequest, service: Service, watch: Watch) -> dict[str, Any]:
    """Classify `texts` with a loaded classifier: per text the top label, the `top_n` most probable labels with
    their probabilities, and every label's probability (a softmax over all labels). Not loaded: 404
    `model_not_loaded`; empty `texts`, more than MAX_PREDICT_TEXTS, a non-string or `top_n` < 1: 422. A client
    that hangs up stops its prediction at the engine's next turn."""
    return await watch.run(service.predict(request.model_id, request.texts, request.top_n, request.batch_size))


@router.get("/models", response_model=ModelListResponse, responses=error_responses(503))
async def list_models(service: Service) -> dict[str, Any]:
    """Every loadable classifier folder under CLASSIFIER_MODELS_PATH, loaded or not."""
    return await service.list_models()


@router.post("/models/query", response_model=ModelListResponse, responses=error_responses(503, body=True))
async def query_models(request: QueryModelsRequest, service: Service) -> dict[str, Any]:
    """The entries of the listing for those of `model_ids` that exist; an empty list is 422."""
    return await service.query(request.model_ids)


@router.get("/status", response_model=ServiceStatusResponse, responses=error_responses())
async def service_status(service: Service) -> dict[str, Any]:
    """Whether classification can run (`running` on the local model; `error` when only Ollama is loaded), the
    engine's device with its memory figures, loaded classifiers, and predictions queued or running."""
    return service.status()
