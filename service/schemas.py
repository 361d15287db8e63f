"""Response bodies of the HTTP API, as documented in OpenAPI (requests: see service.inputs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(
        description="short stable identifier, e.g. 'upload-too-large'", examples=["not-an-image"]
    )
    message: str = Field(description="what went wrong, for a person", examples=["the upload is not an image"])


class ErrorBody(BaseModel):
    error: ErrorDetail


class SearchResult(BaseModel):
    model_config = ConfigDict(extra="forbid")  # /search builds its answer from these: a stray field fails

    rank: int = Field(description="1 for the best match")
    id: int = Field(description="photo id in this snapshot")
    key: str = Field(
        description="which photo this is: its path relative to the collection root (or the manifest's id, "
        "where the collection's manifest gives ids)",
        examples=["animals/cat/0001.jpg"],
    )
    score: float = Field(description="cosine similarity of sketch and photo embeddings (higher is closer)")
    url: str = Field(description="where to fetch the photo (GET /photos/{id})")
    metadata: dict[str, Any] = Field(description="what the index builder stored with the photo")


class SearchResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: list[SearchResult]
    snapshot: str = Field(description="id of the snapshot that answered")
    model: str = Field(description="sha256 of the model checkpoint that encoded the sketch")
    batch_size: int = Field(description="sketches encoded in the same forward pass as this one")
    timings_ms: dict[str, float] = Field(
        description="milliseconds per stage: read, decode, queue, encode, search, metadata, total",
        examples=[
            {
                "read": 0.1,
                "decode": 3.2,
                "queue": 4.1,
                "encode": 41.0,
                "search": 2.3,
                "metadata": 0.4,
                "total": 51.5,
            }
        ],
    )


class ReadyResponse(BaseModel):
    status: str = Field(description="always 'ready'", examples=["ready"])
    snapshot: str = Field(description="id of the snapshot being served")
    warnings: list[str] | None = Field(
        None,
        description="present when something needs an operator while this snapshot serves: the newer "
        "snapshot CURRENT names was refused (and why), or the serving snapshot's folder is gone from disk",
    )


class ReloadResponse(BaseModel):
    changed: bool = Field(description="false when CURRENT already names the serving snapshot")
    snapshot: str
    seconds: float


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "a Content-Length that is not a number, or a client that went away mid-body",
        408: "the body did not all arrive within the request timeout (the connection is closed)",
        413: "the body or the image's pixel count is too large",
        415: "not multipart/form-data or application/json, or an image format other than PNG, JPEG, WebP",
        422: "empty body, not an image, corrupt image, malformed JSON, bad strokes, bad k",
        503: "no snapshot loaded yet, or too many requests waiting (retry after the Retry-After seconds)",
    }.items()
}
