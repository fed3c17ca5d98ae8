"""Group operations of the old `/ws` protocol: preload a group, move its lenses off devices.

Used by `legacy/ws.py` for `preload_group` / `load_group` (v2 preload, lens by lens) and
`unload_group` (each replica holding a lens of the group moves its idle lenses to the host
tier; a lens still in use stays).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from deployments.config import GroupSpec
from deployments.ingress.preload import preload_lenses
from deployments.ingress.schemas import PreloadItem
from deployments.ingress.state import IngressState

# Rounds of unload calls: Serve routes each to a replica holding the lens; a second round
# reaches replicas that held a lens the first round's replica did not.
UNLOAD_ROUNDS = 3


async def preload_group(state: IngressState, group: GroupSpec) -> AsyncIterator[PreloadItem]:
    """Load every lens of the group onto its replicas, yielding each outcome."""
    async for item in preload_lenses(state, group, [lens.lens_id for lens in group.lenses]):
        yield item


async def unload_group(state: IngressState, group: GroupSpec) -> dict[str, Any]:
    """Move the group's idle lenses off every replica's device; return what moved and stayed."""
    evicted: set[str] = set()
    kept: list[str] = []
    for _ in range(UNLOAD_ROUNDS):
        replicas = (await state.snapshots(fresh=True)).get(group.group_id, [])
        held = list(dict.fromkeys(x for r in replicas for x in r.lenses.device))
        held = [lens_id for lens_id in held if lens_id not in evicted]
        if not held:
            break
        kept = []
        for lens_id in held:
            if lens_id in evicted:
                continue
            moved = await state.call(lens_id, "unload_lenses")
            evicted.update(moved["evicted"])
            kept.extend(moved["kept"])
    return {"evicted": sorted(evicted), "kept": sorted(set(kept))}
