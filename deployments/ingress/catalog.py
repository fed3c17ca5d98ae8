"""The catalog views: groups and lenses as the API lists them, from config, sizes and status.

Read by the groups and lenses routes: group files give ids and names, `ops/sizes.py` the
bytes, replica statuses the residency and measured switch times (DESIGN §Response shapes).
"""

from __future__ import annotations

import statistics

from deployments.config import GroupSpec
from deployments.ingress.schemas import (
    ErrorInfo,
    GroupInfo,
    LensDetail,
    LensInfo,
    LensSizes,
    MemoryEstimate,
    Residency,
    SwitchEstimate,
)
from deployments.ingress.state import IngressState
from deployments.ops.sizes import GroupSizes
from deployments.replica.status import ReplicaStatus

# Estimates used until a replica has measured a switch (DESIGN §HTTP API groups list):
# a memory-mapped read of lens tensors, a host-to-device copy, and a replica process start.
DISK_BYTES_PER_SECOND = 1.0e9
HOST_BYTES_PER_SECOND = 10.0e9
REPLICA_START_SECONDS = 10.0


def residency_of(replicas: list[ReplicaStatus]) -> dict[str, list[Residency]]:
    """Lens id -> where it is held, from replica statuses (device and host tiers)."""
    held: dict[str, list[Residency]] = {}
    for replica in replicas:
        for tier, lens_ids in (("device", replica.lenses.device), ("host", replica.lenses.host)):
            for lens_id in lens_ids:
                held.setdefault(lens_id, []).append(
                    Residency(replica_id=replica.replica_id, tier=tier)
                )
    return held


def measured_means(replicas: list[ReplicaStatus]) -> dict[str, float]:
    """Return mean measured seconds per switch kind (and `base`), weighted by count.

    Kinds no replica has measured are left out.
    """
    totals: dict[str, tuple[float, int]] = {}
    for replica in replicas:
        for kind, stats in replica.load_history.items():
            if stats.count > 0:
                seconds, n = totals.get(kind, (0.0, 0))
                totals[kind] = (seconds + stats.mean_seconds * stats.count, n + stats.count)
    return {kind: seconds / n for kind, (seconds, n) in totals.items()}


def estimate_switch(
    sizes: GroupSizes, replicas: list[ReplicaStatus], cold_history: list[float]
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


def lens_problem(
    state: IngressState, lens_id: str, replicas: list[ReplicaStatus]
) -> ErrorInfo | None:
    """Why a lens cannot serve now: a replica's failed load, else the start-up check.

    A start-up problem stands until a replica has loaded the lens (its file was fixed).
    """
    for replica in replicas:
        failure = replica.failures.get(lens_id)
        if failure is not None:
            return ErrorInfo(code=failure.code, message=failure.message)
    startup = state.report.lenses.get(lens_id)
    if startup is not None and not any(lens_id in replica.loads for replica in replicas):
        return ErrorInfo(code=startup[0], message=startup[1])
    return None


def lens_infos(
    state: IngressState, group: GroupSpec, sizes: GroupSizes, replicas: list[ReplicaStatus]
) -> list[LensInfo]:
    """Return the lenses of one group with their sizes, residency and availability."""
    held = residency_of(replicas)
    problems = {lens.lens_id: lens_problem(state, lens.lens_id, replicas) for lens in group.lenses}
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
            status="unavailable" if problems[lens.lens_id] else "available",
            reason=problems[lens.lens_id],
        )
        for lens in group.lenses
    ]


def group_info(state: IngressState, group: GroupSpec, replicas: list[ReplicaStatus]) -> GroupInfo:
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
        lenses=lens_infos(state, group, sizes, replicas),
        status="unavailable" if group.group_id in state.report.groups else "available",
        reason=state.report.groups.get(group.group_id),
    )


def lens_detail(state: IngressState, lens_id: str, replicas: list[ReplicaStatus]) -> LensDetail:
    """One lens: group, layer, t_text, donor, sizes and residency."""
    group = state.group_for_lens(lens_id)
    lens = group.lens(lens_id)
    sizes = state.sizes[group.group_id]
    size = sizes.lenses[lens_id]
    problem = lens_problem(state, lens_id, replicas)
    return LensDetail(
        lens_id=lens_id,
        group_id=group.group_id,
        name=lens.name,
        layer=lens.layer,
        t_text=size.t_text,
        donor=lens.donor,
        bytes=size.tensor_bytes,
        visible=lens.visible,
        residency=residency_of(replicas).get(lens_id, []),
        status="unavailable" if problem else "available",
        reason=problem,
        sizes=LensSizes(
            lens_bytes=size.tensor_bytes,
            checkpoint_file_bytes=size.file_bytes,
            base_bytes=sizes.base_bytes,
            donor_bytes=sizes.donor_bytes.get(lens.donor, 0) if lens.donor else 0,
        ),
        problem=size.problem,
    )
