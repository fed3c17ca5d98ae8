"""The status registry: a small named Ray actor that every group replica reports to.

Serve's handle reaches one replica per call, so the ingress reads group status here to see
every running replica (DESIGN §Response shapes, group status). Replicas push a
`ReplicaStatus` through `StatusPublisher` whenever what they hold or run changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import ray

from deployments.replica.status import ReplicaStatus

REGISTRY_NAME = "lens-serve-registry"
REGISTRY_NAMESPACE = "serve"
# Replicas push on every change and on every health check (Serve's default period: 10 s).
# A snapshot older than this belongs to a replica that stopped answering.
STALE_AFTER_SECONDS = 45.0
# Changes within this window go out as one push (a burst of requests is one update), so
# the group status is at most this late.
PUBLISH_DELAY_SECONDS = 0.1

Key = tuple[str, str, str]  # (app name, group id, replica id)


@ray.remote(num_cpus=0)
class StatusRegistry:
    """Latest status per (application, group, replica); only live replicas are reported.

    Keyed by application too, so two Serve apps with the same group id never mix.
    """

    def __init__(self) -> None:
        self._snapshots: dict[Key, tuple[float, ReplicaStatus]] = {}

    def push(self, status: ReplicaStatus) -> None:
        """Store one replica's latest status."""
        key = (status.app_name, status.group_id, status.replica_id)
        known = self._snapshots.get(key)
        # Pushes are fire-and-forget and may arrive out of order: keep the newest.
        if known is None or known[1].updated_at <= status.updated_at:
            self._snapshots[key] = (time.monotonic(), status)

    def forget(self, app_name: str, group_id: str, replica_id: str) -> None:
        """Drop a replica that is shutting down."""
        self._snapshots.pop((app_name, group_id, replica_id), None)

    def all_status(self, app_name: str) -> dict[str, list[ReplicaStatus]]:
        """Statuses of the application's live replicas, by group id, ordered by replica id."""
        self._drop_dead()
        by_group: dict[str, list[ReplicaStatus]] = {}
        for (app, group_id, _), (_, status) in sorted(self._snapshots.items()):
            if app == app_name:
                by_group.setdefault(group_id, []).append(status)
        return by_group

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for key, (received, status) in list(self._snapshots.items()):
            if now - received > STALE_AFTER_SECONDS or not _is_actor_alive(status):
                del self._snapshots[key]


def _is_actor_alive(status: ReplicaStatus) -> bool:
    # A replica killed without a graceful shutdown never calls `forget`; its named actor is
    # gone from the GCS as soon as Ray sees it die, well before the snapshot goes stale.
    if not status.actor_name:
        return True
    try:
        ray.get_actor(status.actor_name, namespace=REGISTRY_NAMESPACE)
    except ValueError:
        return False
    return True


def get_registry() -> ray.actor.ActorHandle:
    """Return the registry actor, creating it if no process has yet.

    Detached: a non-detached actor dies with the process that created it, and that is often a
    group replica that later scales to zero, which would empty the group status of every
    other group until their next push. It holds only snapshots and ends with the cluster.
    """
    return StatusRegistry.options(
        name=REGISTRY_NAME,
        namespace=REGISTRY_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
    ).remote()


class StatusPublisher:
    """Pushes a replica's status to the registry: at once, or coalesced after a change."""

    def __init__(self, snapshot: Callable[[], ReplicaStatus], *, enabled: bool) -> None:
        self._snapshot = snapshot
        self._enabled = enabled
        self._registry: ray.actor.ActorHandle | None = None
        self._scheduled = False

    def changed(self) -> None:
        """Note a change; one push follows within `PUBLISH_DELAY_SECONDS`."""
        if not self._enabled or self._scheduled:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_later(PUBLISH_DELAY_SECONDS, self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        self.publish_now()

    def publish_now(self, *, reconnect: bool = False) -> None:
        """Push the current status now (fire and forget).

        `reconnect` looks the registry up again: a restarted one has a new handle.
        """
        if not self._enabled:
            return
        if self._registry is None or reconnect:
            self._registry = get_registry()
        self._registry.push.remote(self._snapshot())

    def forget(self, app_name: str, group_id: str, replica_id: str) -> None:
        """Take this replica out of the registry (graceful shutdown)."""
        if self._registry is not None:
            self._registry.forget.remote(app_name, group_id, replica_id)
            self._registry = None
