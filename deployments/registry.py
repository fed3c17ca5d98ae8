"""The status registry: a small named Ray actor that every group replica reports to.

Serve's handle reaches one replica per call, so the ingress reads group status here to see
every running replica (DESIGN §Response shapes, group status).
"""

from __future__ import annotations

import time
from typing import Any

import ray

REGISTRY_NAME = "lens-serve-registry"
REGISTRY_NAMESPACE = "serve"
# Replicas push on every change and on every health check (Serve's default period: 10 s).
# A snapshot older than this belongs to a replica that stopped answering.
STALE_AFTER_SECONDS = 45.0


@ray.remote(num_cpus=0)
class StatusRegistry:
    """Latest status snapshot per (group_id, replica_id); only live replicas are reported."""

    def __init__(self) -> None:
        self._snapshots: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}

    def push(self, snapshot: dict[str, Any]) -> None:
        """Store one replica's `GroupServer.status()` snapshot."""
        key = (snapshot["group_id"], snapshot["replica_id"])
        self._snapshots[key] = (time.monotonic(), snapshot)

    def forget(self, group_id: str, replica_id: str) -> None:
        """Drop a replica that is shutting down."""
        self._snapshots.pop((group_id, replica_id), None)

    def group_status(self, group_id: str) -> list[dict[str, Any]]:
        """Snapshots of the group's live replicas, ordered by replica id."""
        self._drop_dead()
        found = [snap for (gid, _), (_, snap) in self._snapshots.items() if gid == group_id]
        return sorted(found, key=lambda snap: snap["replica_id"])

    def all_status(self) -> dict[str, list[dict[str, Any]]]:
        """Snapshots of every live replica, by group id."""
        self._drop_dead()
        by_group: dict[str, list[dict[str, Any]]] = {}
        for (group_id, _), (_, snap) in sorted(self._snapshots.items()):
            by_group.setdefault(group_id, []).append(snap)
        return by_group

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for key, (received, snap) in list(self._snapshots.items()):
            if now - received > STALE_AFTER_SECONDS or not _is_actor_alive(snap):
                del self._snapshots[key]


def _is_actor_alive(snapshot: dict[str, Any]) -> bool:
    # A replica killed without a graceful shutdown never calls `forget`; its named actor is
    # gone from the GCS as soon as Ray sees it die, well before the snapshot goes stale.
    actor_name = snapshot.get("actor_name")
    if not actor_name:
        return True
    try:
        ray.get_actor(actor_name, namespace=REGISTRY_NAMESPACE)
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
