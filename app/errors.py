"""One family of domain errors, each carrying its HTTP status and a stable error code.

`app.api.errors` turns them into JSON `{"error": code, "message": text}` in one place; foreign
errors (httpx, torch, peft, faiss) are converted into these where they occur.
"""

from __future__ import annotations


class AppError(Exception):
    """Base of every error the service reports to a caller."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequestError(AppError):
    """The caller sent something the service cannot use."""

    status_code = 400
    code = "bad_request"


class ValidationFailedError(AppError):
    """The request body does not match its schema."""

    status_code = 422
    code = "validation_error"


class NotFoundError(AppError):
    """The thing asked for does not exist."""

    status_code = 404
    code = "not_found"


class NumericalFailureError(AppError):
    """The chosen adapter (or weighted mix) produced non-finite numbers for this input; the request cannot be
    answered with it, and the requests it shared a batch with are unaffected."""

    status_code = 422
    code = "numerical_failure"


class EngineFailureError(AppError):
    """The generation engine failed on this request (a defect of ours, logged with its traceback); the engine and
    the other requests go on."""

    status_code = 500
    code = "engine_failure"


class ConflictError(AppError):
    """The operation clashes with one already running."""

    status_code = 409
    code = "conflict"


class SeveralWorkersError(ConflictError):
    """A run-time change refused because several worker processes serve, each with its own state."""

    code = "several_workers"


class InvalidStoreVersionError(AppError):
    """A kept vector store version fails its checks (tampered, incomplete, other embedding model),
    so it cannot be made live."""

    status_code = 409
    code = "invalid_store_version"


class BackendUnavailableError(AppError):
    """The generation backend cannot answer now (Ollama down, model missing, model failed to load)."""

    status_code = 503
    code = "backend_unavailable"


class ServiceBusyError(AppError):
    """Too many generations in flight and queued."""

    status_code = 503
    code = "busy"


class BackendTimeoutError(AppError):
    """The backend did not answer within the deadline."""

    status_code = 504
    code = "backend_timeout"


class UpstreamRateLimitedError(AppError):
    """The remote engine refused for its rate limit; the caller may retry after `retry_after` seconds."""

    status_code = 429
    code = "rate_limited"


class UpstreamError(AppError):
    """The remote engine answered an error that is not the caller's (its message is passed on)."""

    status_code = 502
    code = "upstream_error"


class NotSupportedError(AppError):
    """The backend cannot do this at all (e.g. a remote engine without runtime adapter loading)."""

    status_code = 501
    code = "not_supported"


class VectorStoreError(AppError):
    """The vector store is missing, tampered with or unreadable."""

    status_code = 503
    code = "vector_store_unavailable"


class ModelLoadError(AppError):
    """A model or adapter could not be loaded."""

    status_code = 503
    code = "model_load_failed"


class DocumentTooLargeError(AppError):
    """An upload over one of the document bounds (its bytes, characters, chunks or parsing memory)."""

    status_code = 413
    code = "payload_too_large"


class UnreadableDocumentError(AppError):
    """A document of a supported kind whose text cannot be read (a damaged PDF, a scan without text, a parse past
    its time bound)."""

    status_code = 422
    code = "unreadable_document"


class AdapterError(AppError):
    """An adapter folder is invalid, unsafe or does not fit the base model."""

    status_code = 400
    code = "invalid_adapter"


class InvalidRequestError(ValidationFailedError):
    """A classification request's fields are invalid (the /api/v1/inference routes' code for 422)."""

    code = "invalid_request"


class ModelNotLoadedError(NotFoundError):
    """The classifier a prediction names is not loaded."""

    code = "model_not_loaded"


class ClassifierNotFoundError(NotFoundError):
    """No loadable classifier folder of that name under CLASSIFIER_MODELS_PATH."""

    code = "model_not_found"


class ClassifierError(BadRequestError):
    """A classifier folder or one of its files is missing, invalid or unsafe (the message names the file)."""

    code = "invalid_classifier"


class ClassifierMismatchError(ClassifierError):
    """A classifier's parts do not fit together or the base model (head width, label count)."""

    status_code = 422
    code = "classifier_mismatch"


class InvalidOutputConstraintError(BadRequestError):
    """A requested output format (a JSON schema) cannot be compiled into a grammar; nothing was generated."""

    code = "invalid_response_format"


class OutputConstraintFailedError(AppError):
    """A reply's output format could not be followed to its end (the schema's grammar ran past its own limits at
    some token); that request fails alone."""

    status_code = 422
    code = "response_format_failed"
