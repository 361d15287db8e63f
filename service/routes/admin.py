"""Admin routes, behind the bearer token (disabled when no token is configured)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import AdminDep, ServiceDep
from service.errors import ApiError
from service.schemas import ErrorBody, ReloadResponse
from service.state import ReloadError

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.post(
    "/reload",
    response_model=ReloadResponse,
    summary="Load what ROOT/CURRENT names now and swap it in (requests keep being served meanwhile)",
    responses={
        401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
        403: {"model": ErrorBody, "description": "the admin API is disabled"},
        409: {"model": ErrorBody, "description": "the snapshot was refused; the old one keeps serving"},
    },
)
async def reload(service: ServiceDep) -> ReloadResponse:
    try:
        result = await service.state.reload(reason="POST /admin/reload")
    except ReloadError as exc:
        raise ApiError(409, "reload-refused", str(exc)) from None
    return ReloadResponse(changed=result.changed, snapshot=result.snapshot, seconds=round(result.seconds, 3))
