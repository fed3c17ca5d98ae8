"""Live lens changes at the ingress: follow each group file and serve its new lens list.

Beside the routes: a lens added, removed or re-pointed in a group file is served (or is
unknown, 404) within `group_reload_s`, without a redeploy; the group replicas follow the same
file themselves (`replica/server.py`). A change that needs new replicas (base, dtype,
replica block, a new group) is logged and left for a redeploy.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from deployments.checks import startup_report
from deployments.config import GroupSpec
from deployments.group_files import file_stamp, reread_group
from deployments.ingress.state import IngressState
from deployments.ops.sizes import measure_group

logger = logging.getLogger("ray.serve")


class GroupWatch:
    """Polls the group files of an ingress's groups and applies lens changes."""

    def __init__(self, state: IngressState) -> None:
        self.state = state
        self._stamps = {gid: file_stamp(g.source_file) for gid, g in state.groups.items()}
        self._task: asyncio.Task[None] | None = None

    def start(self, period_s: float) -> None:
        """Poll every `period_s` seconds (0: never) in a background task."""
        if period_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(period_s))

    def stop(self) -> None:
        """End the background task."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.refresh()
            except Exception:  # a bad poll must not end the watch; the next one retries
                logger.exception("reading the group files failed")

    async def refresh(self) -> list[str]:
        """Apply every changed group file now; return the ids of the groups that changed."""
        changed = []
        for group_id, group in list(self.state.groups.items()):
            stamp = file_stamp(group.source_file)
            if stamp is None or stamp == self._stamps.get(group_id):
                continue
            self._stamps[group_id] = stamp
            if await self._apply(group, group.source_file):
                changed.append(group_id)
        return changed

    async def _apply(self, group: GroupSpec, path: Path | None) -> bool:
        new, why = await asyncio.to_thread(reread_group, group)
        if new is None:
            logger.warning("group file %s changed but is not applied: %s", path, why)
            return False
        sizes = await asyncio.to_thread(measure_group, new)
        report = await asyncio.to_thread(startup_report, [new])
        self.state.replace_group(new, sizes, report.lenses)
        logger.info("group %s now serves lenses %s", new.group_id,
                    [lens.lens_id for lens in new.lenses])  # fmt: skip
        return True
