"""Preloading: bring a group's lenses onto its replicas, several at a time.

Used by `POST /api/v2/groups/{group_id}/preload` (JSON or SSE) and the WebSocket's
`preload` message; each lens goes down as one `ensure_lens` call (DESIGN §HTTP API).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from deployments.config import GroupSpec
from deployments.ingress.errors import UnknownLens, error_body
from deployments.ingress.schemas import ErrorInfo, PreloadItem, PreloadRequest
from deployments.ingress.state import IngressState
from lenscore import LensError


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
