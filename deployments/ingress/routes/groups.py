"""`/api/v2/groups`: groups with sizes and residency, per-replica status, preload."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import StreamingResponse

from deployments.config import GroupSpec
from deployments.ingress.auth import require_api_key
from deployments.ingress.catalog import group_info
from deployments.ingress.preload import preload_ids, preload_lenses
from deployments.ingress.schemas import (
    AUTH_ERRORS,
    ErrorBody,
    GroupList,
    GroupStatus,
    PreloadRequest,
    PreloadResult,
)
from deployments.ingress.state import IngressState

router = APIRouter(
    prefix="/api/v2/groups",
    tags=["groups"],
    dependencies=[Depends(require_api_key)],
    responses=AUTH_ERRORS,
)

SSE_MEDIA_TYPE = "text/event-stream"


@router.get("", response_model=GroupList, summary="Groups, lenses, sizes and residency")
async def list_groups(request: Request) -> GroupList:
    """Every group with memory estimates, per-lens residency and switch-time estimates."""
    state: IngressState = request.app.state.ingress
    snapshots = await state.snapshots()
    return GroupList(
        groups=[group_info(state, g, snapshots.get(gid, [])) for gid, g in state.groups.items()]
    )


@router.get(
    "/{group_id}/status",
    response_model=GroupStatus,
    responses={404: {"model": ErrorBody}},
    summary="Every running replica of a group",
)
async def group_status(group_id: str, request: Request) -> GroupStatus:
    """Device, memory, lenses per tier, donors and in-flight requests of every replica."""
    state: IngressState = request.app.state.ingress
    replicas = await state.group_replicas(group_id)
    return GroupStatus(group_id=group_id, replicas=replicas)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _sse_events(
    state: IngressState, group: GroupSpec, lens_ids: list[str]
) -> AsyncIterator[bytes]:
    results = []
    async for item in preload_lenses(state, group, lens_ids):
        results.append(item)
        yield _sse("lens", item.model_dump(exclude_none=True))
    summary = PreloadResult(group_id=group.group_id, results=results)
    yield _sse("done", summary.model_dump(exclude_none=True))


@router.post(
    "/{group_id}/preload",
    response_model=PreloadResult,
    response_model_exclude_none=True,
    responses={
        200: {"content": {SSE_MEDIA_TYPE: {}}, "description": "JSON, or SSE: one event per lens"},
        404: {"model": ErrorBody},
        422: {"model": ErrorBody},
    },
    summary="Load a group's lenses into its replicas",
)
async def preload(
    group_id: str, request: Request, body: Annotated[PreloadRequest | None, Body()] = None
) -> PreloadResult | StreamingResponse:
    """Load every lens of the group (or `lens_ids`); `Accept: text/event-stream` streams."""
    state: IngressState = request.app.state.ingress
    group = state.group(group_id)
    lens_ids = preload_ids(group, body)
    if SSE_MEDIA_TYPE in request.headers.get("accept", ""):
        return StreamingResponse(
            _sse_events(state, group, lens_ids),
            media_type=SSE_MEDIA_TYPE,
            headers={"Cache-Control": "no-cache"},
        )
    results = [item async for item in preload_lenses(state, group, lens_ids)]
    results.sort(key=lambda item: lens_ids.index(item.lens_id))
    return PreloadResult(group_id=group_id, results=results)
