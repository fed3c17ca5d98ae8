"""What the ingress routes share: ids, handles, sizes, replica statuses, calls to groups.

One `IngressState` per ingress replica, on `app.state.ingress` (STYLE §4). Routes reach a
group replica only through `call` / `open_stream`, which send the request down the group's
handle with the lens id as Serve's multiplexed model id and time cold starts (DESIGN §Serving
shape, "Router" and "Cold start").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, NoReturn

from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from deployments.checks import StartupReport
from deployments.config import AppArgs, GroupSpec
from deployments.ingress.errors import GroupUnavailable, UnknownGroup, UnknownLens, translate
from deployments.ops.metrics import RouterMetrics
from deployments.ops.sizes import GroupSizes, measure_group
from deployments.replica.registry import get_registry
from deployments.replica.status import ReplicaStatus

logger = logging.getLogger("ray.serve")

# How long a registry snapshot is reused for cold-start detection and the groups list.
SNAPSHOT_TTL_SECONDS = 1.0
# Registry calls must not hang a request when the registry actor is gone.
REGISTRY_TIMEOUT_SECONDS = 5.0
# Cold-start waits kept per group for the measured estimate.
COLD_HISTORY = 32


class IngressState:
    """Everything the routes share (`app.state.ingress`): ids, handles, sizes, snapshots."""

    def __init__(
        self,
        args: AppArgs,
        groups: list[GroupSpec],
        handles: dict[str, DeploymentHandle],
        metrics: RouterMetrics,
        report: StartupReport,
        *,
        app_name: str = "",
    ) -> None:
        self.args = args
        self.app_name = app_name
        self.report = report
        self.groups = {group.group_id: group for group in groups}
        self.group_of_lens = {lens.lens_id: group for group in groups for lens in group.lenses}
        self.metrics = metrics
        self.sizes: dict[str, GroupSizes] = {}
        self.cold_seconds: dict[str, deque[float]] = {
            g: deque(maxlen=COLD_HISTORY) for g in self.groups
        }
        self.is_ready = False
        self._handles = handles
        self._lens_handles: dict[tuple[str, bool], DeploymentHandle] = {}
        self._snapshots: dict[str, list[ReplicaStatus]] = {}
        self._snapshots_at = float("-inf")
        self._refresh_lock = asyncio.Lock()
        self._registry: Any = None
        self.has_snapshot = False  # False until the registry answers (and after it fails)

    async def start(self) -> None:
        """Measure base, donor and lens sizes once (reads checkpoint headers, off the loop)."""
        for group_id, group in self.groups.items():
            self.sizes[group_id] = await asyncio.to_thread(measure_group, group)
        for lens_id, group in self.group_of_lens.items():
            if group.group_id in self.report.groups:
                self.metrics.ray.record_failure(group.group_id, "base_unavailable", lens_id)
            elif lens_id in self.report.lenses:
                code = self.report.lenses[lens_id][0]
                self.metrics.ray.record_failure(group.group_id, code, lens_id)
        self.is_ready = True

    def replace_group(
        self, group: GroupSpec, sizes: GroupSizes, lens_problems: dict[str, tuple[str, str]]
    ) -> None:
        """Serve a group's new lens list (a live change of its file, `ingress/group_watch.py`).

        Lenses gone from the file are unknown from now on (404); handles of gone lenses are
        dropped; start-up problems are those of the new file.
        """
        old = self.groups[group.group_id]
        gone = {lens.lens_id for lens in old.lenses} - {lens.lens_id for lens in group.lenses}
        self.groups[group.group_id] = group
        for lens in old.lenses:
            self.group_of_lens.pop(lens.lens_id, None)
            self.report.lenses.pop(lens.lens_id, None)
        for lens in group.lenses:
            self.group_of_lens[lens.lens_id] = group
        self.report.lenses.update(lens_problems)
        self.sizes[group.group_id] = sizes
        for key in [key for key in self._lens_handles if key[0] in gone]:
            del self._lens_handles[key]

    # --- ids -------------------------------------------------------------------------------

    def group(self, group_id: str) -> GroupSpec:
        """Return the group with this id; raise `UnknownGroup` (404) otherwise."""
        try:
            return self.groups[group_id]
        except KeyError:
            raise UnknownGroup(group_id) from None

    def group_for_lens(self, lens_id: str) -> GroupSpec:
        """Return the group serving this lens; raise `UnknownLens` (404) otherwise."""
        try:
            return self.group_of_lens[lens_id]
        except KeyError:
            raise UnknownLens(lens_id) from None

    def lens_handle(self, lens_id: str, *, stream: bool = False) -> DeploymentHandle:
        """One configured handle per lens id (each `.options()` call builds a new handle).

        Raises:
            UnknownLens: no group has this lens.
            GroupUnavailable: its group's base could not load at start-up.

        """
        key = (lens_id, stream)
        handle = self._lens_handles.get(key)
        if handle is None:
            group = self.group_for_lens(lens_id)
            if group.group_id in self.report.groups:
                raise GroupUnavailable(group.group_id, self.report.groups[group.group_id])
            handle = self._handles[group.group_id].options(
                multiplexed_model_id=lens_id, stream=stream
            )
            self._lens_handles[key] = handle
        return handle

    # --- replica snapshots (replica/registry.py) ----------------------------------------------

    async def snapshots(self, *, fresh: bool = False) -> dict[str, list[ReplicaStatus]]:
        """Return the status of every running replica by group id, from the registry actor.

        Reused for `SNAPSHOT_TTL_SECONDS` unless `fresh`; one refresh runs at a time and the
        callers waiting on it share its answer. An unreachable registry reads as the last
        snapshot (logged), so listing never fails because of it.
        """
        asked_at = time.monotonic()
        if not fresh and asked_at - self._snapshots_at <= SNAPSHOT_TTL_SECONDS:
            return self._snapshots
        async with self._refresh_lock:
            if self._snapshots_at >= asked_at:
                return self._snapshots  # refreshed while this caller waited
            started = time.monotonic()
            try:
                registry = self._get_registry()
                snapshot = await asyncio.wait_for(
                    registry.all_status.remote(self.app_name), REGISTRY_TIMEOUT_SECONDS
                )
            except Exception:  # the registry is advisory here: log and keep the last one
                logger.warning(
                    "replica registry unreachable; using the last snapshot", exc_info=True
                )
                self._registry = None
                self.has_snapshot = False
                return self._snapshots
            self._snapshots = {g: list(snapshot.get(g, [])) for g in self.groups}
            self._snapshots_at = started
            self.has_snapshot = True
        return self._snapshots

    def _get_registry(self) -> Any:
        if self._registry is None:
            self._registry = get_registry()
        return self._registry

    async def group_replicas(self, group_id: str) -> list[ReplicaStatus]:
        """Every running replica of one group, fresh from the registry."""
        self.group(group_id)
        return (await self.snapshots(fresh=True)).get(group_id, [])

    # --- calls -----------------------------------------------------------------------------

    async def call(self, lens_id: str, method: str, *args: Any) -> Any:
        """Call a lens method of the group replica; errors come back as `LensError`s."""
        handle = self.lens_handle(lens_id)
        await self._wait_if_cold(lens_id)
        response = getattr(handle, method).remote(*args)
        try:
            return await asyncio.wait_for(_await(response), self.args.request_timeout_s)
        except BaseException as exc:
            cancel_quietly(response)
            _reraise(exc)

    async def open_stream(
        self, lens_id: str, method: str, *args: Any
    ) -> tuple[Any, DeploymentResponseGenerator]:
        """Start a streaming call and wait for its first item, so errors keep their status."""
        handle = self.lens_handle(lens_id, stream=True)
        await self._wait_if_cold(lens_id)
        stream = getattr(handle, method).remote(*args)
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.args.request_timeout_s)
        except StopAsyncIteration:
            return None, stream
        except BaseException as exc:
            cancel_quietly(stream)
            _reraise(exc)
        return first, stream

    async def _wait_if_cold(self, lens_id: str) -> None:
        """Measure `lens_cold_start_seconds`: a group with no running replica is waited for.

        The wait is timed as one `ensure_lens` call (replica start, base load, lens load), so
        the analysis that follows is not counted in it.
        """
        group_id = self.group_for_lens(lens_id).group_id
        if not await self._is_cold(group_id):
            return
        started = time.monotonic()
        response = self.lens_handle(lens_id).ensure_lens.remote()
        try:
            await asyncio.wait_for(_await(response), self.args.request_timeout_s)
        except BaseException as exc:
            cancel_quietly(response)
            _reraise(exc)
        seconds = time.monotonic() - started
        self.metrics.record_cold_start(group_id, seconds)
        self.cold_seconds[group_id].append(seconds)
        self._snapshots_at = float("-inf")  # the group has a replica now

    async def _is_cold(self, group_id: str) -> bool:
        # A cached "no replica" is confirmed with a fresh snapshot; without a registry
        # answer nothing counts as cold (no false cold starts while it is unreachable).
        if (await self.snapshots()).get(group_id) or not self.has_snapshot:
            return False
        replicas = (await self.snapshots(fresh=True)).get(group_id)
        return self.has_snapshot and not replicas


def cancel_quietly(response: DeploymentResponse | DeploymentResponseGenerator) -> None:
    """Cancel a handle call that may still run; a call that already ended is left alone.

    NOTE: `DeploymentResponse.cancel()` re-raises the call's own error (e.g. Serve's
    `BackPressureError`) when the call already failed; that error is reported elsewhere.
    """
    try:
        response.cancel()
    except Exception:  # the call had ended with an error the caller already handles
        logger.debug("cancel of a finished handle call raised", exc_info=True)


def _reraise(exc: BaseException) -> NoReturn:
    translated = translate(exc)
    if translated is exc:
        raise exc
    raise translated from exc


async def _await(awaitable: Any) -> Any:
    # `asyncio.wait_for` takes coroutines; a DeploymentResponse is only awaitable.
    return await awaitable
