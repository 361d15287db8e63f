"""GET /photos/{id}: a photo of the serving snapshot by id (never by a path a client gives)."""

import asyncio
import io
import mimetypes
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse
from PIL import Image

from model.images import ImageError, load_image
from service.deps import PairDep, ServiceDep
from service.errors import ApiError
from service.schemas import ErrorBody
from service.settings import Settings

THUMBNAIL_QUALITY = 85
MAX_PHOTO_ID = 2**63 - 1  # ids are signed 64-bit (FAISS and SQLite): anything larger is refused with 422


def make_thumbnail(path: FilePath, size: int) -> bytes:
    """Blocking: the photo scaled to fit `size` x `size` (never enlarged), as JPEG bytes."""
    try:
        img = load_image(path)
    except ImageError as exc:
        if exc.reason == "missing":
            raise ApiError(404, "photo-missing", "the photo's file is no longer on disk") from None
        raise ApiError(500, "photo-unreadable", f"the stored photo cannot be decoded: {exc.reason}") from None
    img.thumbnail((size, size), Image.LANCZOS, reducing_gap=2.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return out.getvalue()


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["photos"])

    @router.get(
        "/photos/{photo_id}",
        name="photo",
        summary="A photo of the serving snapshot, whole or as a bounded thumbnail",
        response_class=Response,
        responses={
            200: {
                "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
                "description": "the photo as stored (any image type the builder indexed), or a JPEG thumbnail",
            },
            304: {"description": "unchanged since the ETag the client holds"},
            404: {"model": ErrorBody, "description": "no photo with that id in the serving snapshot, or its file is gone"},
            422: {"model": ErrorBody, "description": "an id or size out of range, or not an integer"},
            500: {"model": ErrorBody, "description": "the stored photo cannot be decoded for a thumbnail"},
            503: {"model": ErrorBody, "description": "no snapshot loaded"},
        },
    )
    async def photo(
        request: Request,
        service: ServiceDep,
        pair: PairDep,
        photo_id: Annotated[int, Path(ge=0, le=MAX_PHOTO_ID, description="an id from a /search answer")],
        # `int`, not `int | None`: the parameter is optional, but `null` is not a value a client can send.
        size: Annotated[
            int,
            Query(ge=16, le=settings.max_thumbnail, description="fit the photo in size x size pixels (JPEG)"),
        ] = None,  # type: ignore[assignment]
    ) -> Response:
        record = (await asyncio.to_thread(pair.snapshot.lookup, [photo_id]))[0]
        if record is None:
            raise ApiError(404, "photo-not-found", f"snapshot {pair.id} has no photo {photo_id}")
        # Ids are per snapshot: the ETag is the photo's content hash, so a reload never serves a stale copy.
        etag = f'"{record["sha256"][:32]}-{size or "full"}"'
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        path = FilePath(record["path"])
        if size is None:
            if not await asyncio.to_thread(path.is_file):
                raise ApiError(404, "photo-missing", "the photo's file is no longer on disk")
            media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            return FileResponse(path, media_type=media, headers=headers)
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(service.decode_pool, make_thumbnail, path, size)
        return Response(data, media_type="image/jpeg", headers=headers)

    return router
