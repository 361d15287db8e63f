"""Operations: liveness, readiness, Prometheus metrics and what is being served."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from model.ground import __version__
from service.deps import ServiceDep
from service.errors import error_body
from service.schemas import ErrorBody, ReadyResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is alive (says nothing about the snapshot)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="A snapshot and its model are loaded and serving",
    response_model=ReadyResponse,
    responses={
        503: {
            "model": ErrorBody,
            "description": "not ready: no snapshot loaded yet (see /info for the last error), or the "
            "encoder worker stopped",
        }
    },
)
async def readyz(service: ServiceDep) -> JSONResponse:
    pair = service.state.current
    if pair is None:
        return JSONResponse(error_body("not-ready", service.state.not_ready_reason()), status_code=503)
    if not service.batcher.alive:
        return JSONResponse(
            error_body("encoder-stopped", "the encoder worker is not running"), status_code=503
        )
    body: dict[str, Any] = {"status": "ready", "snapshot": pair.id}
    if warnings := service.state.warnings():
        body["warnings"] = warnings
    return JSONResponse(body)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/info", summary="Model, snapshot, counts, batching limits and the last reload (error)")
async def info(service: ServiceDep) -> dict[str, Any]:
    s, state = service.settings, service.state
    pair = state.current
    snapshot = model = None
    if pair is not None:
        snap = pair.snapshot
        snapshot = {
            "id": snap.id,
            "photos": int(snap.count),
            "dim": int(snap.dim),
            "model_sha256": snap.model_sha256,
        }
        model = pair.model.describe()
    return {
        "version": __version__,
        "ready": pair is not None,
        "snapshot": snapshot,
        "model": model,
        "last_reload": state.last_reload,
        "last_reload_error": state.last_reload_error,
        "queue_depth": service.batcher.depth(),
        "encoder_running": service.batcher.alive,
        "limits": {
            "max_k": s.max_k,
            "default_k": s.default_k,
            "max_upload_bytes": s.max_upload_bytes,
            "max_batch": s.max_batch,
            "max_wait_ms": s.max_wait_ms,
            "max_queue": s.max_queue,
            "max_thumbnail": s.max_thumbnail,
        },
        "reload_interval_s": s.reload_interval_s,
        "admin_enabled": s.admin_token is not None,
    }
