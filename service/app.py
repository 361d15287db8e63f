"""The FastAPI application: `create_app(settings)` composes routers, error handlers and lifespan.

Startup loads the snapshot named by ROOT/CURRENT (the server accepts connections only after that
attempt) and starts the batcher thread and the CURRENT watcher; shutdown drains and closes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from types import ModuleType

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.ground import __version__
from service.batcher import BatcherStopped, MicroBatcher, QueueFull
from service.deps import Service
from service.errors import ApiError, error_body
from service.metrics import ServiceMetrics
from service.routes import admin, ops, page, photos, search
from service.settings import Settings
from service.state import NotReady, ServingPair, ServingState

LOG = logging.getLogger(__name__)
RETRY_AFTER_S = "1"


def create_app(settings: Settings, snapshots: ModuleType | None = None) -> FastAPI:
    """The app for one process (one model and index). `snapshots`: the snapshot reader module
    (index_builder.snapshot unless a test gives another)."""
    import torch

    metrics = ServiceMetrics()
    # The encoder's CPU threads, settled here: a batcher thread that runs only the heads sets torch's
    # count to one (service/state.py), and torch would hand that count to threads started later, such
    # as a reload's, which would then size a new model's onnxruntime pool by it.
    cpu_threads = settings.torch_threads or torch.get_num_threads()
    state = ServingState(
        settings.snapshot_root, settings.device, metrics, settings.reload_interval_s, snapshots=snapshots,
        cpu_runtime=settings.cpu_runtime, cpu_threads=cpu_threads, cpu_precision=settings.cpu_precision,
        max_batch=settings.max_batch, query_twin=settings.query_twin,
    )
    one_forward = settings.batch_forwards == "one"
    batcher = MicroBatcher(
        # "one": two stages, one batch's forward at a time (onnxruntime spreads it over every core), its
        # search and metadata lookup while the next batch's forward runs (service/batcher.py). The
        # batcher's key is the ServingPair a request leased, so its methods are the stages.
        ServingPair.encode if one_forward else ServingPair.encode_and_search,
        finish=ServingPair.search_encoded if one_forward else None,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.max_queue,
        on_batch=metrics.observe_batch,
        on_start=lambda: configure_threads(settings),
        workers=settings.batch_workers,
    )
    metrics.track_queue(batcher.depth)
    service = Service(
        settings=settings,
        state=state,
        batcher=batcher,
        metrics=metrics,
        decode_pool=ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="sbir-decode"),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        await state.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)  # queued sketches finish first
            await state.stop()
            metrics.ready.set(0)
            service.decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="sbir",
        version=__version__,
        summary="Zero-shot sketch-based image retrieval: send a sketch, get the matching photos.",
        lifespan=lifespan,
    )
    app.state.service = service
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization"],
        )
    app.include_router(search.build_router(settings))
    app.include_router(photos.build_router(settings))
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.include_router(page.build_router())
    _add_error_handlers(app)
    return app


def configure_threads(settings: Settings) -> None:
    """On the batcher's thread, where the encoder and FAISS run: OpenMP thread counts are per thread."""
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if settings.faiss_threads is not None:
        import faiss

        faiss.omp_set_num_threads(settings.faiss_threads)


def _json_error(status: int, code: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _json_error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors]
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
        return _json_error(422, "invalid-request", "; ".join(parts) or "invalid request", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            return _json_error(404, "not-found", f"there is no route {where} (the API is listed at /docs)")
        if exc.status_code == 405:
            return _json_error(405, "method-not-allowed", f"{where} is not allowed", exc.headers)
        return _json_error(exc.status_code, f"http-{exc.status_code}", str(exc.detail), exc.headers)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady) -> JSONResponse:
        return _json_error(503, "not-ready", str(exc), {"Retry-After": RETRY_AFTER_S})

    @app.exception_handler(QueueFull)
    async def overloaded(request: Request, exc: QueueFull) -> JSONResponse:
        request.app.state.service.metrics.searches.labels("overloaded", "unknown").inc()
        return _json_error(503, "overloaded", str(exc), {"Retry-After": RETRY_AFTER_S})

    @app.exception_handler(BatcherStopped)
    async def stopping(request: Request, exc: BatcherStopped) -> JSONResponse:
        return _json_error(503, "encoder-stopped", str(exc), {"Retry-After": RETRY_AFTER_S})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback too; the client gets JSON, not a bare text page.
        LOG.error("unexpected error on %s %s: %r", request.method, request.url.path, exc)
        return _json_error(500, "internal-error", "the server failed to answer this request; it is logged")
