"""`/api/v2/groups`: groups with sizes and residency, per-replica status, preload."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import StreamingResponse

from deployments.auth import require_api_key
from deployments.config import GroupSpec
from deployments.errors import UnknownLens, error_body
from deployments.ingress import IngressState
from deployments.schemas import (
    AUTH_ERRORS,
    ErrorBody,
    ErrorInfo,
    GroupInfo,
    GroupList,
    GroupStatus,
    LensInfo,
    MemoryEstimate,
    PreloadItem,
    PreloadRequest,
    PreloadResult,
    Residency,
    SwitchEstimate,
)
from deployments.sizes import GroupSizes
from lenscore import LensError

router = APIRouter(
    prefix="/api/v2/groups",
    tags=["groups"],
    dependencies=[Depends(require_api_key)],
    responses=AUTH_ERRORS,
)

# Estimates used until a replica has measured a switch (DESIGN §HTTP API groups list):
# a memory-mapped read of lens tensors, a host-to-device copy, and a replica process start.
DISK_BYTES_PER_SECOND = 1.0e9
HOST_BYTES_PER_SECOND = 10.0e9
REPLICA_START_SECONDS = 10.0

SSE_MEDIA_TYPE = "text/event-stream"


def residency_of(replicas: list[dict[str, Any]]) -> dict[str, list[Residency]]:
    """Lens id -> where it is held, from replica snapshots (`lenses.device` / `lenses.host`)."""
    held: dict[str, list[Residency]] = {}
    for replica in replicas:
        lenses = replica.get("lenses", {})
        for tier in ("device", "host"):
            for lens_id in lenses.get(tier, []):
                held.setdefault(lens_id, []).append(
                    Residency(replica_id=str(replica.get("replica_id", "")), tier=tier)
                )
    return held


def measured_means(replicas: list[dict[str, Any]]) -> dict[str, float]:
    """Return mean measured seconds per switch kind (and `base`), weighted by count.

    Reads each snapshot's `load_history: {kind: {"count", "mean_seconds", ...}}`; kinds no
    replica has measured are left out.
    """
    totals: dict[str, tuple[float, int]] = {}
    for replica in replicas:
        for kind, stats in (replica.get("load_history") or {}).items():
            count = int(stats.get("count", 0))
            if count > 0:
                seconds, n = totals.get(kind, (0.0, 0))
                totals[kind] = (seconds + float(stats["mean_seconds"]) * count, n + count)
    return {kind: seconds / n for kind, (seconds, n) in totals.items()}


def estimate_switch(
    sizes: GroupSizes, replicas: list[dict[str, Any]], cold_history: list[float]
) -> SwitchEstimate:
    """Return switch seconds per tier: measured where replicas or the router have history."""
    known = [s.tensor_bytes for s in sizes.lenses.values() if s.tensor_bytes is not None]
    lens_bytes = statistics.fmean(known) if known else 0.0
    measured = measured_means(replicas)
    sources = {
        "host": "measured" if "host" in measured else "estimated",
        "disk": "measured" if "disk" in measured else "estimated",
        "cold": "measured" if cold_history else "estimated",
    }
    disk = measured.get("disk", lens_bytes / DISK_BYTES_PER_SECOND)
    base = measured.get("base", sizes.base_bytes / DISK_BYTES_PER_SECOND)
    if cold_history:
        cold = statistics.fmean(cold_history)
    else:
        cold = REPLICA_START_SECONDS + base + disk
    values = {
        "host": measured.get("host", lens_bytes / HOST_BYTES_PER_SECOND),
        "disk": disk,
        "cold": cold,
    }
    return SwitchEstimate(
        **{kind: round(value, 6) for kind, value in values.items()},
        source="measured" if "measured" in sources.values() else "estimated",
        sources=sources,
    )


def lens_infos(
    group: GroupSpec, sizes: GroupSizes, replicas: list[dict[str, Any]]
) -> list[LensInfo]:
    """Return the lenses of one group with their sizes and residency."""
    held = residency_of(replicas)
    return [
        LensInfo(
            lens_id=lens.lens_id,
            name=lens.name,
            layer=lens.layer,
            t_text=sizes.lenses[lens.lens_id].t_text,
            donor=lens.donor,
            bytes=sizes.lenses[lens.lens_id].tensor_bytes,
            visible=lens.visible,
            residency=held.get(lens.lens_id, []),
        )
        for lens in group.lenses
    ]


def group_info(state: IngressState, group: GroupSpec, replicas: list[dict[str, Any]]) -> GroupInfo:
    """One entry of the groups list (DESIGN §Response shapes)."""
    sizes = state.sizes[group.group_id]
    return GroupInfo(
        group_id=group.group_id,
        name=group.name,
        description=group.description,
        base_model=group.base_model.name,
        visible=group.visible,
        memory_estimate=MemoryEstimate(
            base_bytes=sizes.base_bytes,
            lens_bytes_total=sum(s.tensor_bytes or 0 for s in sizes.lenses.values()),
            donor_bytes=sum(sizes.donor_bytes.values()),
        ),
        estimated_switch_seconds=estimate_switch(
            sizes, replicas, list(state.cold_seconds[group.group_id])
        ),
        replicas_running=len(replicas),
        lenses=lens_infos(group, sizes, replicas),
    )


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


def preload_ids(group: GroupSpec, body: PreloadRequest | None) -> list[str]:
    """Return the lens ids to preload: the body's (each must be in this group) or all."""
    if body is None or body.lens_ids is None:
        return [lens.lens_id for lens in group.lenses]
    mine = {lens.lens_id for lens in group.lenses}
    for lens_id in body.lens_ids:
        if lens_id not in mine:
            raise UnknownLens(lens_id, group_id=group.group_id)
    return list(dict.fromkeys(body.lens_ids))


async def _preload_one(state: IngressState, lens_id: str, gate: asyncio.Semaphore) -> PreloadItem:
    async with gate:
        try:
            loaded = await state.call(lens_id, "ensure_lens")
        except LensError as exc:
            return PreloadItem(
                lens_id=lens_id, ok=False, error=ErrorInfo(**error_body(exc)["error"])
            )
    fields = {k: loaded.get(k) for k in ("replica_id", "kind", "seconds", "bytes")}
    return PreloadItem(lens_id=lens_id, ok=True, **fields)


async def preload_lenses(
    state: IngressState, group: GroupSpec, lens_ids: list[str]
) -> AsyncIterator[PreloadItem]:
    """Load lenses in parallel, yielding each outcome as it finishes.

    At most `max_lenses_per_replica` loads run at once, so a preload does not evict the lenses
    it has just loaded on a single replica. Leaving early cancels the loads still running.
    """
    gate = asyncio.Semaphore(group.replica.max_lenses_per_replica)
    tasks = [asyncio.ensure_future(_preload_one(state, lens_id, gate)) for lens_id in lens_ids]
    try:
        for next_done in asyncio.as_completed(tasks):
            yield await next_done
    finally:
        for task in tasks:
            task.cancel()


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
