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
from lenscore import LensError

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


async def preload_messages(
    state: IngressState, group: GroupSpec, kind: str
) -> AsyncIterator[dict[str, Any]]:
    """Yield `group_preload_progress` per lens, then `group_preload_complete`.

    `load_group` also gets the old unified API's `group_loaded`.
    """
    loaded, failed, total = [], {}, len(group.lenses)
    async for item in preload_group(state, group):
        if item.ok:
            loaded.append(item.lens_id)
        else:
            failed[item.lens_id] = item.error.message if item.error else "failed"
        yield {"type": "group_preload_progress", "group_id": group.group_id,
               "lens_id": item.lens_id, "ok": item.ok, "done": len(loaded) + len(failed),
               "total": total}  # fmt: skip
    message = f"Preloaded {len(loaded)} of {total} lenses of group {group.group_id}"
    done = {"group_id": group.group_id, "message": message, "loaded_models": loaded,
            "failed": failed}  # fmt: skip
    yield {"type": "group_preload_complete", **done}
    if kind == "load_group":
        yield {"type": "group_loaded", **done, "device_id": None}


async def unload_message(state: IngressState, group: GroupSpec) -> dict[str, Any]:
    """Unload the group; return `group_unload_complete` (or `group_unload_error`)."""
    try:
        moved = await unload_group(state, group)
    except LensError as exc:
        return {"type": "group_unload_error", "group_id": group.group_id, "error": exc.message}
    kept = f"; {len(moved['kept'])} in use stay" if moved["kept"] else ""
    return {
        "type": "group_unload_complete",
        "group_id": group.group_id,
        "group_name": group.name,
        "evicted": moved["evicted"],
        "kept": moved["kept"],
        "message": f"moved {len(moved['evicted'])} lenses of {group.name} off the devices "
        f"to host memory{kept}",
    }
