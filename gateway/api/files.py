"""Stored images: signed URLs for anyone holding them, and authenticated access for their tenant."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from gateway.api.deps import PrincipalDep, SessionDep, StateDep, public_base_url
from gateway.errors import NotFound, PermissionDenied
from gateway.storage import repo
from gateway.storage.models import StoredFile, is_id

router = APIRouter(tags=["files"])


def _serve(state: StateDep, f: StoredFile) -> FileResponse:
    path = state.files.resolve(f.path)
    if not path.exists():
        raise NotFound("The file's content is no longer stored.")
    # Content never changes for a file id, so clients and CDNs may cache it for as long as the URL lives.
    return FileResponse(path, media_type=f.content_type, headers={"Cache-Control": "private, max-age=3600"})


@router.get("/files/{file_id}")
async def signed_file(
    file_id: str, session: SessionDep, state: StateDep, expires: int = 0, signature: str = ""
) -> FileResponse:
    """The bytes behind a signed URL; a tampered or expired signature is a 403."""
    if not is_id(file_id, "file") or not state.signer.verify(file_id, expires, signature):
        raise PermissionDenied("This file URL is invalid or has expired.", code="invalid_signature")
    f = await repo.get_file(session, file_id=file_id)
    if f is None:
        raise NotFound(f"No file with id '{file_id}'.")
    return _serve(state, f)


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
async def file_content(file_id: str, principal: PrincipalDep, session: SessionDep, state: StateDep) -> FileResponse:
    """A file's bytes, for its own tenant's key."""
    return _serve(state, await _own_file(session, principal, file_id))
