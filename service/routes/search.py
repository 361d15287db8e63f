"""POST /search: a sketch in, ranked photos out, with the time each stage took."""

import asyncio
import logging
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from service.deps import ServiceDep
from service.errors import ApiError
from service.inputs import (
    ACCEPTED_MEDIA_TYPES,
    FILE_FIELD,
    SketchJSON,
    decode_sketch,
    media_type,
    read_body,
    unsupported_media_type,
)
from service.schemas import ERROR_RESPONSES, SearchResponse, SearchResult
from service.settings import Settings
from service.state import ServingPair
from service.strokes import MAX_ABS_COORD, MAX_POINTS, MAX_STROKES

LOG = logging.getLogger(__name__)


def _request_body_doc() -> dict:
    """The three accepted forms, for OpenAPI (the body is parsed by hand, off the event loop)."""
    strokes_example = {"strokes": [[[10, 120, 240], [200, 20, 200]], [[60, 190], [130, 130]]]}
    image_example = SketchJSON.model_config["json_schema_extra"]["examples"][0]
    return {
        "requestBody": {
            "required": True,
            "description": (
                f"The sketch: a multipart upload in field `{FILE_FIELD}` (PNG, JPEG or WebP), or JSON with "
                "either `image` (the same formats, base64) or `strokes` (QuickDraw's simplified format, "
                "rendered server-side like a pen drawing)."
            ),
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FILE_FIELD],
                        "properties": {
                            FILE_FIELD: {
                                "type": "string",
                                "format": "binary",
                                "description": "the sketch, PNG, JPEG or WebP (dark lines on white)",
                            }
                        },
                    },
                    "encoding": {FILE_FIELD: {"contentType": "image/png, image/jpeg, image/webp"}},
                },
                "application/json": {
                    "schema": sketch_json_schema(),
                    "examples": {
                        "image": {"summary": "a base64 PNG", "value": image_example},
                        "strokes": {"summary": "QuickDraw strokes: an A", "value": strokes_example},
                    },
                },
            },
        }
    }


def sketch_json_schema() -> dict:
    """The JSON body as OpenAPI states it: exactly one of `image` or `strokes` (SketchJSON checks the
    same at run time), with the stroke limits `service.strokes` enforces. What JSON Schema cannot say
    (x and y of a stroke have the same length, at most MAX_POINTS points in all, the image decodes)
    is refused with 422 and said in the descriptions."""
    fields = SketchJSON.model_fields
    coordinate = {"type": "number", "minimum": -MAX_ABS_COORD, "maximum": MAX_ABS_COORD}
    values = {"type": "array", "items": coordinate, "minItems": 1, "maxItems": MAX_POINTS}
    stroke = {
        "type": "array",
        "items": values,
        "minItems": 2,
        "maxItems": 3,
        "description": "[[x...], [y...]] with as many x as y values (a third list, of times, is ignored)",
    }
    image = {"type": "string", "minLength": 1, "description": fields["image"].description}
    strokes = {
        "type": "array",
        "items": stroke,
        "minItems": 1,
        "maxItems": MAX_STROKES,
        "description": f"{fields['strokes'].description}; at most {MAX_POINTS} points in all",
    }
    return {
        "title": "SketchJSON",
        "description": SketchJSON.__doc__,
        "oneOf": [
            {"title": "image", "type": "object", "properties": {"image": image}, "required": ["image"],
             "additionalProperties": False},
            {"title": "strokes", "type": "object", "properties": {"strokes": strokes}, "required": ["strokes"],
             "additionalProperties": False},
        ],
    }  # fmt: skip


def build_router(settings: Settings) -> APIRouter:
    """Built per app so that OpenAPI states this server's own maximum k."""
    router = APIRouter(tags=["search"])
    # `int`, not `int | None`: k is optional, but `null` is not a value a client can send.
    KQuery = Annotated[
        int,
        Query(
            ge=1, le=settings.max_k, description=f"how many photos to return (default {settings.default_k})"
        ),
    ]

    @router.post(
        "/search",
        response_model=SearchResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=_request_body_doc(),
        summary="Find the photos that match a sketch",
    )
    async def search(request: Request, service: ServiceDep, k: KQuery = settings.default_k) -> Response:
        start = time.perf_counter()
        form = "unknown"
        # Bounds what waits in memory (bodies, decoded images) before the batcher's own queue does.
        if service.searches_in_flight >= settings.max_queue:
            service.metrics.searches.labels("overloaded", form).inc()
            raise ApiError(
                503, "overloaded", f"{settings.max_queue} searches are already in progress; retry shortly",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        service.searches_in_flight += 1
        try:
            answer, form = await _search(request, service, k, start)
        except ApiError as exc:
            service.metrics.searches.labels(f"http_{exc.status}", form).inc()
            raise
        finally:
            service.searches_in_flight -= 1
        service.metrics.searches.labels("ok", form).inc()
        # Serialised here, once: returned as a model, FastAPI would dump it, validate the dump against
        # `response_model` again and encode that (0.07 against 0.01 ms of CPU a request).
        return Response(answer.model_dump_json(), media_type="application/json")

    return router


async def _search(request: Request, service: ServiceDep, k: int, start: float) -> tuple[SearchResponse, str]:
    settings = service.settings
    content_type = request.headers.get("content-type")
    if media_type(content_type) not in ACCEPTED_MEDIA_TYPES:
        raise unsupported_media_type(media_type(content_type))
    body = await read_body(request, settings.max_upload_bytes, settings.request_timeout_s)
    t_read = time.perf_counter()

    pair = service.state.acquire()  # this request finishes on this pair, even if a reload swaps it out
    try:
        loop = asyncio.get_running_loop()
        with service.batcher.incoming():  # a batch that is forming may wait for this sketch
            pixels, form = await loop.run_in_executor(service.decode_pool, _decode, body, content_type, pair)
            t_decode = time.perf_counter()
            waiting = service.batcher.enqueue(pair, (pixels, k))
        hit, batch = await waiting
        snapshot_id, model_sha = pair.id, pair.snapshot.model_sha256
    finally:
        pair.release()

    base = str(request.base_url)
    results = []
    for score, photo_id, record in hit.found:
        if record is None:
            LOG.warning("snapshot %s returned id %d without metadata", snapshot_id, photo_id)
            continue
        results.append(
            SearchResult(
                rank=len(results) + 1,
                id=photo_id,
                key=record["key"],
                score=round(score, 6),
                url=f"{base}photos/{photo_id}",
                metadata=record.get("metadata") or {},
            )
        )
    timings = {
        "read": t_read - start,
        "decode": t_decode - t_read,
        "queue": batch.queued_s,
        "encode": hit.encode_s,
        "search": hit.search_s,
        "metadata": hit.metadata_s,
        "total": time.perf_counter() - start,
    }
    service.metrics.observe_stages(timings)
    answer = SearchResponse(
        results=results,
        snapshot=snapshot_id,
        model=model_sha,
        batch_size=batch.batch_size,
        timings_ms={stage: round(s * 1000, 3) for stage, s in timings.items()},
    )
    return answer, form


def _decode(body: bytes, content_type: str | None, pair: ServingPair):
    """Worker thread: parse the body, decode or render the sketch, preprocess it for the model."""
    image, form = decode_sketch(body, content_type)
    return pair.model.preprocess_sketch(image), form
