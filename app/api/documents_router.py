"""Documents over HTTP: upload one into a collection, list them, delete one; and the collections there are.

The /documents routes need an admin key where keys are configured (app/api/security.py); GET /collections
is for every caller, so clients can offer the document sets to ask in.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile

from app.api.deps import CHANGES_DOCUMENTS, get_documents
from app.api.disconnect import Watch
from app.api.schemas import (
    CollectionEntry,
    CollectionsResponse,
    DocumentDeletedResponse,
    DocumentEntry,
    DocumentListResponse,
    DocumentResponse,
    error_responses,
)
from app.rag.collections import DEFAULT_COLLECTION
from app.rag.documents import DocumentService

router = APIRouter(tags=["documents"])
Documents = Annotated[DocumentService, Depends(get_documents)]


@router.post(
    "/documents",
    status_code=201,
    response_model=DocumentResponse,
    dependencies=CHANGES_DOCUMENTS,
    responses={200: {"model": DocumentResponse, "description": "the same content was there already"},
               **error_responses(409, 413, 415, 422, 503, body=True, admin=True)},
)
async def upload_document(
    documents: Documents,
    response: Response,
    file: Annotated[UploadFile, File(description="the document: .md, .txt, .html or .pdf")],
    watch: Watch,
    collection: Annotated[str, Form(max_length=64, description="the collection to add it to")] = DEFAULT_COLLECTION,
) -> DocumentResponse:
    """Index one document in `collection` (created by its first document) and answer once it is searchable.

    The file's name (no folders) is how answers cite it; a document of the same name in the collection is
    replaced. The same content again answers 200 with the document already there, and nothing is added.
    Refused, with nothing written: an empty file (400), a name with path parts (400), a file whose bytes are not
    text, HTML or PDF whatever its name (415), a file over MAX_UPLOAD_MB (413), a PDF without readable text
    (422), text over MAX_DOCUMENT_CHARS or MAX_DOCUMENT_CHUNKS chunks, or reading it needing more than
    UPLOAD_PARSE_MB (413), reading it taking longer than UPLOAD_PARSE_SECONDS (422). Another ingestion writing the
    collection meanwhile (`scripts/ingest.py`): 409. A client that leaves before the answer: nothing is written."""
    data = await file.read()
    info, created = await watch.run(documents.add(file.filename or "", data, collection))
    if not created:
        response.status_code = 200
    return DocumentResponse.model_validate(info, from_attributes=True)


@router.get("/documents", response_model=DocumentListResponse, responses=error_responses(404, admin=True))
async def list_documents(
    documents: Documents,
    collection: Annotated[str | None, Query(max_length=64, description="only this collection")] = None,
) -> DocumentListResponse:
    """The documents of one collection, or of all of them, as the versions being served hold them."""
    listed = await documents.list(collection)
    return DocumentListResponse(documents=[DocumentEntry.model_validate(info, from_attributes=True) for info in listed])


@router.delete(
    "/documents/{document_id}", response_model=DocumentDeletedResponse,
    responses=error_responses(404, 409, 422, admin=True), dependencies=CHANGES_DOCUMENTS,
)
async def delete_document(
    documents: Documents,
    document_id: str,
    purge: Annotated[bool, Query(description="also rewrite the versions kept for rollback without it, so no copy "
                                             "of it stays readable on disk")] = False,
) -> DocumentDeletedResponse:
    """Take a document out of both indexes of its collection (a new store version); 404 when unknown."""
    return DocumentDeletedResponse.model_validate(await documents.delete(document_id, purge), from_attributes=True)


@router.get("/collections", response_model=CollectionsResponse, responses=error_responses())
async def list_collections(documents: Documents) -> CollectionsResponse:
    """The collections questions can name (`collection` on /ask and on /v1/chat/completions with `rag`)."""
    described = await documents.collections()
    return CollectionsResponse(collections=[CollectionEntry.model_validate(c, from_attributes=True) for c in described])
