"""How a stored file is sent (checkpoint and adapter zips, exports, uploads): from this host's
disk, streamed from the object store through the API, or, with FINETUNE_STORAGE_REDIRECT_S, as a
307 to a presigned URL of the store that expires. The owner checks happened before: the
services hand out only the owner's StoredFile. Each carries its recorded SHA-256 in
`X-Checksum-Sha256` (the redirect too, so a client can check what it got from the store)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from app.services.downloads import StoredFile
from app.settings import get_settings

# What a download route may answer besides its file (for its OpenAPI entry).
REDIRECT: dict[int | str, dict[str, Any]] = {
    307: {
        "description": "With FINETUNE_STORAGE_REDIRECT_S set: `Location` is a presigned URL of the "
        "object store that expires; `X-Checksum-Sha256` is the file's"
    }
}


def send_file(file: StoredFile, media_type: str) -> Response:
    headers = {"X-Checksum-Sha256": file.sha256} if file.sha256 else {}
    redirect_s = get_settings().storage_redirect_s
    url = file.store.download_url(file.path, file.filename, redirect_s) if redirect_s else None
    if url is not None:
        return RedirectResponse(url, status_code=307, headers=headers)
    local = file.store.local_file(file.path)
    if local is not None:
        return FileResponse(local, media_type=media_type, filename=file.filename, headers=headers)
    disposition = f"attachment; filename*=utf-8''{quote(file.filename)}"
    return StreamingResponse(
        file.store.chunks(file.path),
        media_type=media_type,
        headers={**headers, "Content-Length": str(file.size_bytes), "Content-Disposition": disposition},
    )
