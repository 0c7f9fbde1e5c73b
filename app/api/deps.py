"""Dependencies that hand routers the services built in the app's lifespan."""

from __future__ import annotations

from fastapi import Depends, Request

from app.classification.service import ClassificationService
from app.errors import SeveralWorkersError
from app.rag.documents import DocumentService
from app.rag.service import RAGService
from app.rag.store_admin import VectorStoreAdmin


def get_rag_service(request: Request) -> RAGService:
    service: RAGService = request.app.state.rag_service
    return service


def get_store_admin(request: Request) -> VectorStoreAdmin:
    admin: VectorStoreAdmin = request.app.state.store_admin
    return admin


def get_documents(request: Request) -> DocumentService:
    documents: DocumentService = request.app.state.documents
    return documents


def one_process_serving(request: Request) -> None:
    """For the routes that change what is served (adapters, the default model, the store, classifiers): refused
    when several worker processes serve together, since each holds its own model, adapters and store view and the
    change would reach only the worker that took the request."""
    if request.app.state.serves_with_other_workers:
        raise SeveralWorkersError(
            "this server runs several worker processes (WORKERS, or uvicorn --workers), each with its own model, "
            "adapters and documents: a change made now would reach only the one that took this request. Make it "
            "in the configuration (LORA_ADAPTERS, DEFAULT_ADAPTER, DEFAULT_BACKEND; scripts/ingest.py for documents) "
            "and restart, or serve with one worker"
        )


def get_classification_service(request: Request) -> ClassificationService:
    service: ClassificationService = request.app.state.classification_service
    return service


def one_process_serving_documents(request: Request) -> None:
    """For the routes that change documents: a store every worker reads live (a Milvus server: `shared`) takes
    the change for all of them; a store each process loads (FAISS versions, Milvus Lite) is `one_process_serving`."""
    if not get_rag_service(request).collections.backend.shared:
        one_process_serving(request)


#: `dependencies=` of every route that changes what is served: adapters, the default model, classifiers.
CHANGES_WHAT_IS_SERVED = [Depends(one_process_serving)]
#: `dependencies=` of every route that changes the documents.
CHANGES_DOCUMENTS = [Depends(one_process_serving_documents)]
