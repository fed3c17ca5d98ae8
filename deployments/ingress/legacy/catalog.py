"""The old clients' views of groups, lenses and devices, from config and replica statuses.

Read by the legacy adapters: `/ws` `model_groups_list` and `model_info`, the slim API's
`models` and `layers`, `/health` and `/api/gpu_stats`. Residency is real: a lens is
`is_gpu_loaded` while some replica holds it on its device, `is_cpu_cached` while one holds it
in its host tier (replica statuses, `replica/registry.py`).
"""

from __future__ import annotations

from typing import Any

from deployments.config import GroupSpec
from deployments.ingress.legacy.schemas import AUTO_BATCH_SIZE_MAX
from deployments.ingress.state import IngressState
from deployments.replica.status import ReplicaStatus

GIB = 1024**3
FIRST_DEVICE_KEYS = (
    "utilization",
    "memory_used",
    "memory_total",
    "memory_percent",
    "peak_utilization",
)

Snapshots = dict[str, list[ReplicaStatus]]


def tiers_of(replicas: list[ReplicaStatus], lens_id: str) -> set[str]:
    """Return the tiers (`device`, `host`) some replica holds the lens on."""
    return {tier for r in replicas if (tier := r.tier_of(lens_id)) is not None}


def device_kind(device: str) -> str:
    """`cuda` or `cpu`: the old `base_locations` values."""
    return "cuda" if device.startswith("cuda") else "cpu"


def model_entry(
    group: GroupSpec, lens_id: str, replicas: list[ReplicaStatus], current: str | None
) -> dict[str, Any]:
    """One lens as the old grouped model switcher lists it."""
    lens = group.lens(lens_id)
    tiers = tiers_of(replicas, lens_id)
    return {
        "id": lens_id,
        "name": lens.name,
        "description": f"layer {lens.layer}" + (f", donor {lens.donor}" if lens.donor else ""),
        "layer": lens.layer,
        "auto_batch_size_max": AUTO_BATCH_SIZE_MAX,
        "visible": lens.visible,
        "backend_only": False,
        "checkpoint_filename": lens.checkpoint.name,
        "checkpoint_full": lens.checkpoint.name,
        "is_loaded": "device" in tiers,
        "is_gpu_loaded": "device" in tiers,
        "is_cpu_cached": "host" in tiers,
        "is_current": lens_id == current,
    }


def model_groups_list(
    state: IngressState, snapshots: Snapshots, current: str | None
) -> dict[str, Any]:
    """Return the `/ws` `model_groups_list` message; `current` is this connection's lens."""
    current_group = state.group_for_lens(current).group_id if current else None
    groups, cache = [], {"groups_loaded": [], "models_cached": [], "base_locations": {}}
    for group_id, group in state.groups.items():
        if not group.visible:
            continue
        replicas = snapshots.get(group_id, [])
        groups.append(
            {
                "group_id": group_id,
                "group_name": group.name,
                "description": group.description,
                "base_model": group.base_model.name,
                "device_info": [
                    {
                        "device": f"{r.device} ({r.replica_id})",
                        "has_group": True,
                        "is_current": group_id == current_group,
                        "is_switching": False,
                    }
                    for r in replicas
                ],  # fmt: skip
                "is_cpu_cached": bool(replicas),
                "models": [
                    model_entry(group, lens.lens_id, replicas, current)
                    for lens in group.lenses
                    if lens.visible
                ],
                "visible": True,
            }
        )
        if replicas:
            cache["groups_loaded"].append(group_id)
            cache["base_locations"][group_id] = device_kind(replicas[0].device)
            held = {x for r in replicas for x in (*r.lenses.device, *r.lenses.host)}
            cache["models_cached"].extend(sorted(held))
    return {
        "type": "model_groups_list",
        "groups": groups,
        "current_group": current_group,
        "current_model": current,
        "memory_info": memory_info(snapshots),
        "model_status": {"cache_info": cache},
        "is_switching": False,
    }


def memory_info(snapshots: Snapshots) -> dict[str, Any]:
    """Device memory of every running replica, in GB as the old page showed it."""
    replicas = [r for group in snapshots.values() for r in group]
    return {
        r.replica_id: {
            "device": r.device,
            "allocated_memory_gb": round(r.memory.allocated_bytes / GIB, 3),
            "total_memory_gb": round(r.memory.total_bytes / GIB, 3),
            "base_gb": round(r.memory.base_bytes / GIB, 3),
            "lenses_gb": round(r.memory.lens_bytes / GIB, 3),
        }
        for r in replicas
    }


def model_info(state: IngressState, lens_id: str, snapshots: Snapshots) -> dict[str, Any]:
    """Return the `/ws` `model_info` message for one lens."""
    group = state.group_for_lens(lens_id)
    lens = group.lens(lens_id)
    replicas = snapshots.get(group.group_id, [])
    tiers = tiers_of(replicas, lens_id)
    return {
        "type": "model_info",
        "model_id": lens_id,
        "display_name": lens.name,
        "model_name": lens.name,
        "layer": lens.layer,
        "auto_batch_size_max": AUTO_BATCH_SIZE_MAX,
        "generation_config": {},
        "loaded": "device" in tiers,
        "locations": [
            {"device_id": r.device, "replica_id": r.replica_id, "tier": r.tier_of(lens_id)}
            for r in replicas
            if r.tier_of(lens_id) is not None
        ],
        "checkpoint": lens.checkpoint.name,
        "checkpoint_filename": lens.checkpoint.name,
        "group_id": group.group_id,
    }


def slim_models(state: IngressState, snapshots: Snapshots) -> dict[str, Any]:
    """`GET /api/slim/models`: groups with their default lens (the first)."""
    groups = [g for g in state.groups.values() if g.visible]
    device_lenses = [x for reps in snapshots.values() for r in reps for x in r.lenses.device]
    return {
        "model_groups": [
            {
                "id": g.group_id,
                "name": g.name,
                "description": g.description,
                "is_loaded": bool(snapshots.get(g.group_id)),
                "default_layer": g.lenses[0].lens_id,
            }
            for g in groups
        ],
        # No global current model any more: the most recently used lens on any device.
        "current_model_id": device_lenses[-1] if device_lenses else None,
    }


def slim_layers(state: IngressState, group: GroupSpec, snapshots: Snapshots) -> dict[str, Any]:
    """`GET /api/slim/models/{group}/layers`: the group's lenses, first one the default."""
    replicas = snapshots.get(group.group_id, [])
    device = [x for r in replicas for x in r.lenses.device]
    current = device[-1] if device else None
    return {
        "group_id": group.group_id,
        "group_name": group.name,
        "is_loaded": bool(replicas),
        "layers": [
            {
                "id": lens.lens_id,
                "name": lens.name,
                "layer": lens.layer,
                "description": f"layer {lens.layer}",
                "is_current": lens.lens_id == current,
            }
            for lens in group.lenses
        ],
        "default_layer": group.lenses[0].lens_id,
    }


def gpu_stats(snapshots: Snapshots) -> dict[str, Any]:
    """`GET /api/gpu_stats` from the replicas' device memory readings.

    Utilization is not measured: a replica reads 100 while it runs a request, else 0.
    """
    devices = {}
    for replicas in snapshots.values():
        for r in replicas:
            total = r.memory.total_bytes
            used = r.memory.allocated_bytes
            busy = 100 if r.in_flight or r.busy_threads else 0
            devices[f"{r.group_id}/{r.replica_id}:{r.device}"] = {
                "utilization": busy,
                "memory_used": round(used / GIB, 2),
                "memory_total": round(total / GIB, 2),
                "memory_percent": round(100 * used / total, 1) if total else 0.0,
                "peak_utilization": busy,
            }
    first = next(iter(devices.values()), {})
    replicas = [r for group in snapshots.values() for r in group]
    return {
        "available": any(r.device.startswith("cuda") for r in replicas),
        "devices": devices,
        # The old page reads the first device at the top level.
        **{key: first.get(key, 0) for key in FIRST_DEVICE_KEYS},
    }
