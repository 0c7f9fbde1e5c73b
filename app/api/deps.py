"""Dependencies that hand routers the services built in the app's lifespan."""

from __future__ import annotations

from fastapi import Request

from app.classification.service import ClassificationService
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


def get_classification_service(request: Request) -> ClassificationService:
    service: ClassificationService = request.app.state.classification_service
    return service
