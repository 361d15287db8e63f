"""From a request body to a sketch image: multipart upload, base64 JSON or QuickDraw strokes.

`read_body` runs on the event loop (it only counts bytes); everything else here is blocking and is
called from a worker thread. Every refusal is an `ApiError` with a status and a readable message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Annotated, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from model.images import ImageError, load_image
from service.errors import ApiError
from service.strokes import StrokesError, render_strokes

MULTIPART = "multipart/form-data"
JSON = "application/json"
ACCEPTED_MEDIA_TYPES = (MULTIPART, JSON)
FILE_FIELD = "file"
ACCEPTED_FORMATS = "PNG, JPEG or WebP"
InputForm = Literal["file", "image", "strokes"]

# Formats we recognise but do not accept, to answer 415 with a name rather than "not an image".
_OTHER_MAGIC = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
)


class SketchJSON(BaseModel):
    """A JSON search body: exactly one of `image` (base64) or `strokes` (QuickDraw simplified)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image": "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAAAAAA6mKC9AAAAPElEQVR42nWPMRIAMAjCwP//mQ51EGzdzOUUKPgUfoAB"
                    "uAzRALWPtlIhzLdXqRAsmNhgCh5dBCqE2F5tD+jDDB8+sAVLAAAAAElFTkSuQmCC"
                },
                {"strokes": [[[10, 120, 240], [200, 20, 200]], [[60, 190], [130, 130]]]},
            ]
        },
    )

    image: str | None = Field(
        None,
        description="a PNG, JPEG or WebP sketch, base64-encoded (a `data:image/...;base64,` prefix is allowed)",
    )
    # Strict: JSON true/false or "1.5" are not coordinates (lax mode would read them as 1.0 and 1.5).
    strokes: list[list[list[Annotated[float, Strict()]]]] | None = Field(
        None,
        description=(
            "vector strokes in QuickDraw's simplified format: a list of strokes, each [[x...], [y...]]; "
            "y grows downwards; any scale (the drawing is fitted to the canvas)"
        ),
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> SketchJSON:
        if (self.image is None) == (self.strokes is None):
            raise ValueError("send exactly one of 'image' (base64) or 'strokes'")
        return self


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes, and with
    408 when it has not all arrived `timeout_s` seconds after reading began (a client trickling it).

    Content-Length is checked first, and the streamed bytes are counted too, since a client may
    send chunked bodies or a wrong length.
    """
    too_large = ApiError(413, "upload-too-large", f"the request body is larger than {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad-content-length", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client-disconnected", "the client went away before sending the body") from None
    except TimeoutError:
        raise ApiError(
            408, "body-timeout", f"the body did not arrive within {timeout_s:g} s ({size} bytes came)",
            headers={"Connection": "close"},
        ) from None  # fmt: skip
    return b"".join(chunks)


def decode_sketch(body: bytes, content_type: str | None) -> tuple[Image.Image, InputForm]:
    """Blocking: a request body of an accepted media type -> RGB sketch image, and which form it was."""
    mt = media_type(content_type)
    if not body:
        raise ApiError(
            422,
            "empty-body",
            "the request body is empty: send a multipart 'file', or JSON with 'image' or 'strokes'",
        )
    if mt == MULTIPART:
        return decode_image(multipart_file(body, content_type or "", FILE_FIELD)), "file"
    if mt == JSON:
        query = parse_json(body)
        if query.strokes is not None:
            try:
                return render_strokes(query.strokes), "strokes"
            except StrokesError as exc:
                raise ApiError(422, "invalid-strokes", str(exc)) from None
        return decode_image(decode_base64(query.image or "")), "image"
    raise unsupported_media_type(mt)


def unsupported_media_type(mt: str) -> ApiError:
    return ApiError(
        415,
        "unsupported-media-type",
        f"Content-Type {mt or '(none)'!r} is not accepted: use {MULTIPART} with a '{FILE_FIELD}' field, "
        f"or {JSON} with 'image' or 'strokes'",
    )


def parse_json(body: bytes) -> SketchJSON:
    try:
        return SketchJSON.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise ApiError(422, "malformed-json", f"the body is not valid JSON: {errors[0]['msg']}") from None
        where = ".".join(str(p) for p in errors[0]["loc"]) or "body"
        raise ApiError(422, "invalid-request", f"{where}: {errors[0]['msg']}") from None


def decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(422, "invalid-base64", "a data URL must look like data:image/png;base64,....")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "invalid-base64", f"'image' is not valid base64: {exc}") from None


def multipart_file(body: bytes, content_type: str, field: str) -> bytes:
    """The bytes of the first part named `field` of a multipart/form-data body."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(422, "malformed-multipart", "multipart Content-Type without a boundary")

    found: list[bytes] = []
    state = {"name": None, "field": b"", "value": b"", "data": []}

    def on_part_begin() -> None:
        state.update(name=None, data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["field"].lower() == b"content-disposition":
            _, disp = parse_options_header(state["value"])
            state["name"] = disp.get(b"name", b"").decode("utf-8", "replace")
        state.update(field=b"", value=b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["name"] == field and not found:
            state["data"].append(data[start:end])

    def on_part_end() -> None:
        if state["name"] == field and not found:
            found.append(b"".join(state["data"]))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(422, "malformed-multipart", f"the multipart body cannot be parsed: {exc}") from None
    if not found:
        raise ApiError(422, "missing-file", f"the multipart body has no '{field}' field")
    return found[0]


def sniff_format(data: bytes) -> str | None:
    """'PNG', 'JPEG', 'WEBP', another format's name, or None when the bytes are no known image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    head = data[:64].lstrip()
    for magic, name in _OTHER_MAGIC:
        if head.startswith(magic):
            return name
    return None


def decode_image(data: bytes) -> Image.Image:
    """PNG/JPEG/WebP bytes -> RGB image; 415 for other formats, 413 for bombs, 422 for the rest."""
    if not data:
        raise ApiError(422, "empty-image", "the uploaded image has zero bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(422, "not-an-image", f"the upload is not an image; send {ACCEPTED_FORMATS}")
    if fmt not in ("PNG", "JPEG", "WEBP"):
        raise ApiError(
            415, "unsupported-image-type", f"{fmt} images are not accepted; send {ACCEPTED_FORMATS}"
        )
    try:
        return load_image(data)
    except ImageError as exc:
        if exc.reason == "too-large":
            raise ApiError(413, "image-too-large", f"the image has too many pixels: {exc.detail}") from None
        if exc.reason == "corrupt":
            raise ApiError(
                422, "corrupt-image", f"the {fmt} image is truncated or corrupt: {exc.detail}"
            ) from None
        raise ApiError(422, "not-an-image", f"the upload cannot be decoded as {fmt}: {exc}") from None
