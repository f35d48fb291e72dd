"""Stored images: signed URLs for anyone holding them, and authenticated access for their tenant."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from gateway.api.deps import PrincipalDep, SessionDep, StateDep, public_base_url
from gateway.errors import NotFound, PermissionDenied
from gateway.storage import repo
from gateway.storage.files import FileMissing
from gateway.storage.models import StoredFile, is_id

router = APIRouter(tags=["files"])


async def _serve(state: StateDep, f: StoredFile) -> Response:
    # Read through the gateway rather than redirected to the store: any replica answers any URL, and a bucket
    # stays private.
    try:
        content = await state.files.read(f.path)
    except FileMissing:
        raise NotFound("The file's content is no longer stored.") from None
    # Content never changes for a file id, so clients and CDNs may cache it for as long as the URL lives.
    return Response(content=content, media_type=f.content_type, headers={"Cache-Control": "private, max-age=3600"})


@router.get("/files/{file_id}")
async def signed_file(
    file_id: str, session: SessionDep, state: StateDep, expires: int = 0, signature: str = ""
) -> Response:
    """The bytes behind a signed URL; a tampered or expired signature is a 403."""
    if not is_id(file_id, "file") or not state.signer.verify(file_id, expires, signature):
        raise PermissionDenied("This file URL is invalid or has expired.", code="invalid_signature")
    f = await repo.get_file(session, file_id=file_id)
    if f is None:
        raise NotFound(f"No file with id '{file_id}'.")
    return await _serve(state, f)


async def _own_file(session: SessionDep, principal: PrincipalDep, file_id: str) -> StoredFile:
    f = await repo.get_file(session, file_id=file_id, tenant_id=principal.tenant.id) if is_id(file_id, "file") else None
    if f is None:  # another tenant's file reads exactly like a missing one
        raise NotFound(f"No file with id '{file_id}'.", param="file_id")
    return f


@router.get("/v1/files/{file_id}")
async def file_metadata(
    file_id: str, principal: PrincipalDep, session: SessionDep, state: StateDep, request: Request
) -> dict[str, Any]:
    """A file's metadata and a fresh signed URL."""
    f = await _own_file(session, principal, file_id)
    return {
        "id": f.id,
        "object": "file",
        "created_at": int(f.created_at.timestamp()),
        "bytes": f.size_bytes,
        "content_type": f.content_type,
        "sha256": f.sha256,
        "width": f.width,
        "height": f.height,
        "generation_id": f.prediction_id,
        "url": state.signer.sign(public_base_url(request, state), f.id),
    }


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, principal: PrincipalDep, session: SessionDep, state: StateDep) -> Response:
    """A file's bytes, for its own tenant's key."""
    return await _serve(state, await _own_file(session, principal, file_id))
