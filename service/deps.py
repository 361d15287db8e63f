"""The running service's parts, and the FastAPI dependencies that hand them to routes."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.batcher import MicroBatcher
from service.errors import ApiError
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.state import ServingPair, ServingState


@dataclass
class Service:
    """One per app (and per process): settings, the serving pair, the batcher, metrics, pools."""

    settings: Settings
    state: ServingState
    batcher: MicroBatcher
    metrics: ServiceMetrics
    decode_pool: ThreadPoolExecutor
    searches_in_flight: int = 0  # only touched on the event loop: no lock needed


async def get_service(request: Request) -> Service:
    # async: FastAPI runs a plain `def` dependency on its thread pool, a hop to another thread and back
    # for every request (docs/BENCHMARKS.md, "The request path, cut")
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def leased_pair(service: ServiceDep) -> AsyncIterator[ServingPair]:
    """The serving pair, kept open until the response has been sent (NotReady -> 503)."""
    pair = service.state.acquire()
    try:
        yield pair
    finally:
        pair.release()


PairDep = Annotated[ServingPair, Depends(leased_pair, scope="request")]


# Declares the bearer scheme in OpenAPI (clients and fuzzers see that /admin/* needs it); the check
# itself is below, so that a missing or wrong token gets our 401 body rather than FastAPI's.
admin_bearer = HTTPBearer(auto_error=False, description="the server's SBIR_ADMIN_TOKEN")


async def require_admin(
    service: ServiceDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer)]
) -> None:
    token = service.settings.admin_token
    if token is None:
        raise ApiError(403, "admin-disabled", "the admin API is disabled: set SBIR_ADMIN_TOKEN to enable it")
    given = credentials.credentials.strip() if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise ApiError(
            401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip


AdminDep = Depends(require_admin)
