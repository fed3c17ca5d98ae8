"""Lens residency on one replica: the switch that brings a lens onto the device.

Below `GroupServer` on the data path. A request's lens comes from the device slots (Serve's
multiplex LRU, `replica/multiplex.py`), else from the host tier, else from disk; loads that
fail are remembered with a back-off (DESIGN §Serving shape, "Tiers"; §Metrics, switch kinds).
Over 400 lines: the switch, its reads, evictions and live lens changes all run under, or
around, the one multiplex lock, and keeping them in one class keeps that lock's rules in
one place; reads ahead and prefetch policy live in `replica/prefetch.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deployments.config import GroupSpec, LensSpec, ReplicaSpec
from deployments.ops.metrics import SWITCH_KINDS, ReplicaMetrics
from deployments.redact import group_paths, redact, redact_text
from deployments.replica.failures import LoadFailures
from deployments.replica.multiplex import DeviceSlots
from deployments.replica.prefetch import Prefetcher, ReadAhead
from deployments.replica.status import LensFailure, LoadStats
from deployments.replica.tiers import DonorCache, HostTier, ResidentLens
from lenscore import (
    BadInput,
    Base,
    IncompatibleLens,
    Lens,
    LensError,
    OutOfDeviceMemory,
    RawCheckpoint,
    load_base,
    load_lens,
)
from lenscore.packed import read_for_serving

# A removed lens still in use is checked for idleness this often.
RETIRE_POLL_SECONDS = 0.5

LogEvent = Callable[..., None]


@dataclasses.dataclass
class _Stats:
    count: int = 0
    seconds: float = 0.0
    nbytes: int = 0

    def add(self, seconds: float, nbytes: int) -> None:
        self.count += 1
        self.seconds += seconds
        self.nbytes += nbytes

    def summary(self) -> LoadStats:
        n = max(self.count, 1)
        return LoadStats(
            count=self.count, mean_seconds=self.seconds / n, mean_bytes=self.nbytes / n
        )


@dataclasses.dataclass(frozen=True)
class Switch:
    """How a request's lens became ready: its kind (SWITCH_KINDS) and time."""

    kind: str
    seconds: float
    ready_at: float = 0.0  # Unix time the lens was ready for this request

    def as_dict(self) -> dict[str, Any]:
        """`{"kind", "seconds", "ready_at"}`, as analysis `meta.switch` reports it."""
        return {"kind": self.kind, "seconds": self.seconds, "ready_at": self.ready_at}


class LensResidency:
    """Which lenses this replica holds on which tier, and the switches between tiers.

    Owns the device slots, the host tier, the donor cache and the failure back-offs. Calls
    `on_change` whenever what it holds changes, so the replica can publish its status.
    """

    def __init__(
        self,
        group: GroupSpec,
        base: Base,
        device: torch.device,
        metrics: ReplicaMetrics,
        *,
        in_serve: bool,
        on_change: Callable[[], None],
        log_event: LogEvent,
    ) -> None:
        self.group = group
        self.paths = group_paths(group)
        self.replica: ReplicaSpec = group.replica
        self.base = base
        self.base_bytes = base.nbytes  # walks every parameter: read it once
        self.device = device
        self.metrics = metrics
        self._on_change = on_change
        self._log_event = log_event
        self.host = HostTier(self.replica.host_cache_bytes)
        self.read_ahead = ReadAhead(self._read_lens)
        self.prefetch = Prefetcher(self, enabled=self.replica.predictive_prefetch,
                                   on_change=on_change, log_event=log_event)  # fmt: skip
        # Host-to-device copies run on a side stream, beside other requests' compute.
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.donors = DonorCache(
            self.replica.max_donors_per_replica, self._load_donor, self._drop_donor
        )
        self.slots = DeviceSlots(
            self._load_resident, self.replica.max_lenses_per_replica, in_serve=in_serve
        )
        self.failed = LoadFailures()
        self.switches = dict.fromkeys(SWITCH_KINDS, 0)
        self.loads: dict[str, int] = {}  # lens id -> loads onto the device (any source)
        self.history: dict[str, _Stats] = {}  # switch kind -> time and bytes moved
        self._retiring: set[asyncio.Future[None]] = set()

    # -- the switch ------------------------------------------------------------------------

    async def acquire(self, lens_id: str) -> tuple[ResidentLens, Switch]:
        """Bring the lens onto the device and count the caller as its user.

        Raises:
            LensError: the lens cannot load (corrupt, missing, incompatible, no memory).

        """
        started = time.perf_counter()
        was_resident = lens_id in self.slots
        self.prefetch.notice(lens_id)
        # A host-tier lens is kept there, so the eviction that makes room for it on the device
        # cannot push it out of the host tier first. Otherwise the disk read starts now, while
        # the request may still wait for Serve's lock: reads of several lenses overlap, only
        # their device copies take turns (DESIGN "Preloading").
        in_host = not was_resident and self.host.touch(lens_id)
        read = not was_resident and not in_host and lens_id not in self.failed
        async with self.read_ahead.request(lens_id, read=read):
            with self.host.keeping(lens_id) if in_host else contextlib.nullcontext():
                resident = await self._acquire_resident(lens_id)
        seconds = time.perf_counter() - started
        kind = "hit" if was_resident else resident.kind
        self.switches[kind] += 1
        self.metrics.record_switch(kind, seconds)
        if kind == "hit":
            self.history.setdefault("hit", _Stats()).add(seconds, 0)
        else:
            self._on_change()  # the load reported before Serve put the lens in its LRU
        return resident, Switch(kind, seconds, ready_at=time.time())

    async def _acquire_resident(self, lens_id: str) -> ResidentLens:
        while True:
            resident = await self.slots.get(lens_id)
            # An eviction can only start while no request holds the lens, so this retries
            # at most once per concurrent eviction.
            if resident.try_acquire():
                return resident

    def retry_now(self, lens_id: str) -> None:
        """Forget a lens's failure back-off: the next request tries to load it again."""
        self.failed.clear(lens_id)

    async def _load_resident(self, lens_id: str) -> ResidentLens:
        # Runs under the multiplex lock, after Serve evicted its LRU lens if it was full.
        spec = self._lens_spec(lens_id)
        self.failed.check(lens_id)
        before = self.memory_bytes()
        started = time.perf_counter()
        try:
            lens, source = await self._bring_to_device(spec)
        except LensError as exc:
            _name_lens(exc, lens_id, self.paths)
            self._record_failure(lens_id, exc)
            raise
        seconds = time.perf_counter() - started
        kind = "first" if not self.loads else source
        self.loads[lens_id] = self.loads.get(lens_id, 0) + 1
        self.failed.clear(lens_id)
        self.metrics.record_load(source, seconds)
        self.history.setdefault(kind, _Stats()).add(seconds, lens.nbytes)
        resident = ResidentLens(lens, kind=kind, on_evict=self._evict_to_host)
        after = self.memory_bytes(extra_lens_bytes=lens.nbytes)
        self._log_event("lens_load", lens_id, kind=kind, source=source, seconds=seconds,
                        bytes=lens.nbytes, memory_before=before, memory_after=after)  # fmt: skip
        self._on_change()
        return resident

    async def _bring_to_device(self, spec: LensSpec) -> tuple[Lens, str]:
        donor = await self._donor_for(spec)
        held = self.host.take(spec.lens_id)
        if held is not None:
            source = "prefetch" if self.prefetch.used(spec.lens_id, held) else "host"
            try:
                await self._make_room(held.nbytes)
                lens = await self._to_device(lambda: held.to(self.device, stream=self._copy_stream))
            except LensError:
                self.host.put(held)
                raise
            return lens, source
        raw = await self._read_claimed(spec)
        if raw.layer_l != spec.layer:
            raise IncompatibleLens(
                f"lens {spec.lens_id}",
                [f"the group file says layer {spec.layer}, the checkpoint's layer_l is "
                 f"{raw.layer_l}"],
            )  # fmt: skip
        await self._make_room(raw.tensor_bytes)
        lens = await self._to_device(
            lambda: load_lens(
                spec.checkpoint,
                self.base,
                donor=donor,
                lens_id=spec.lens_id,
                device=self.device,
                raw=raw,
                stream=self._copy_stream,
            )  # fmt: skip
        )
        return lens, "disk"

    async def _read_claimed(self, spec: LensSpec) -> RawCheckpoint:
        """Await the read started when the request arrived; read anew if none or stale."""
        pending = self.read_ahead.claim(spec.lens_id)
        if pending is not None:
            try:
                checkpoint, raw = await pending.task
            finally:
                self.read_ahead.done(pending)
            if checkpoint == spec.checkpoint:  # not re-pointed meanwhile
                return raw
        return (await asyncio.to_thread(self._read_lens, spec.lens_id))[1]

    def _read_lens(self, lens_id: str) -> tuple[Path, RawCheckpoint]:
        """Read a lens's tensors into host memory (a thread): packed file first, if fresh."""
        spec = self._lens_spec(lens_id)
        raw = read_for_serving(spec.checkpoint, packed_dir=self.replica.packed_cache_dir,
                               pinned=self.device.type == "cuda")  # fmt: skip
        return spec.checkpoint, raw

    async def _to_device(self, move: Callable[[], Lens]) -> Lens:
        """Run a load in a thread; on a device OOM free what is unused and try once more."""
        try:
            return await asyncio.to_thread(move)
        except (torch.OutOfMemoryError, OutOfDeviceMemory):
            await self._evict_idle_locked()
        try:
            return await asyncio.to_thread(move)
        except (torch.OutOfMemoryError, OutOfDeviceMemory) as exc:
            raise OutOfDeviceMemory(
                "the device has no room for this lens even after evicting unused lenses; "
                "retry later or lower max_lenses_per_replica",
                {"group_id": self.group.group_id},
            ) from exc

    async def _make_room(
        self, need_bytes: int, *, strict: bool = True, replica: ReplicaSpec | None = None
    ) -> None:
        """Evict LRU lenses until base + donors + lenses + `need_bytes` fit the budget.

        The caller holds the multiplex lock (a load, or `reconfigure`, which passes the
        `replica` sizes it is about to apply).

        Raises:
            OutOfDeviceMemory: base and donors alone leave no room (only when `strict`).

        """
        budget = (replica or self.replica).device_memory_budget_bytes
        if budget is None:
            return
        fixed = self.base_bytes + self.donors.nbytes
        if strict and fixed + need_bytes > budget:
            raise OutOfDeviceMemory(
                f"group {self.group.group_id}: base and donors ({fixed} bytes) plus this lens "
                f"({need_bytes} bytes) exceed device_memory_budget_gb ({budget} bytes)",
                {"budget_bytes": budget, "need_bytes": fixed + need_bytes},
            )
        while self.slots.resident():
            if fixed + self.device_lens_bytes() + need_bytes <= budget:
                return
            await self.slots.evict_lru()

    # -- freeing the device ----------------------------------------------------------------

    async def free_device_memory(self, keep: str | None = None) -> None:
        """Evict every lens nobody uses (but `keep`) to the host tier; empty the CUDA cache.

        NOTE: a load or eviction already holding the multiplex lock may itself be waiting
        for the caller's lens to go idle; waiting for the lock here would deadlock, so a busy
        lock means that eviction frees memory instead of this one.
        """
        if self.slots.is_locked():
            if self.device.type == "cuda":
                await asyncio.to_thread(torch.cuda.empty_cache)
            return
        async with self.slots.locked():
            await self._evict_idle_locked(keep)

    async def _evict_idle_locked(self, keep: str | None = None) -> None:
        idle = [r.lens_id for r in self.slots.resident() if r.users == 0 and r.lens_id != keep]
        await self.slots.evict_chosen(idle)
        if self.device.type == "cuda":
            await asyncio.to_thread(torch.cuda.empty_cache)

    async def _evict_to_host(self, resident: ResidentLens) -> None:
        before = self.memory_bytes()
        started = time.perf_counter()
        pinned = self.device.type == "cuda"  # page-locked: faster, async copies back
        lens = await asyncio.to_thread(resident.lens.to_host, pinned=pinned)
        dropped = self.host.put(lens)
        self._log_event("lens_evict", resident.lens_id, seconds=time.perf_counter() - started,
                        bytes=resident.nbytes, dropped_from_host=dropped,
                        memory_before=before, memory_after=self.memory_bytes())  # fmt: skip
        self._on_change()

    async def reconfigure(self, replica: ReplicaSpec) -> None:
        """Apply new cache sizes: shrink or grow the device LRU, host tier and donor cache.

        The status reports the new sizes (`self.replica`) only once the caches fit them, so
        a reader never sees a limit the replica is still evicting down to.
        """
        await self.slots.resize(replica.max_lenses_per_replica)
        async with self.slots.locked():
            await self._make_room(0, strict=False, replica=replica)
        self.host.resize(replica.host_cache_bytes)
        self.prefetch.configure(replica.predictive_prefetch)
        self.donors.max_donors = replica.max_donors_per_replica
        self.donors.trim(self.donors.max_donors, pinned=self._pinned_donors())
        self.replica = replica

    # -- live lens changes -----------------------------------------------------------------

    async def apply_group(self, group: GroupSpec) -> list[str]:
        """Serve a group file's new lens list; return the lenses whose copies must go.

        A removed or re-pointed lens (checkpoint, layer or donor changed) is dropped from the
        host tier now and leaves the device once no request uses it; until then a request
        that already holds it finishes on the old copy.
        """

        def source(spec: LensSpec, of: GroupSpec) -> tuple[Any, ...]:
            donor = of.donor(spec.donor).path if spec.donor else None
            return spec.checkpoint, spec.layer, donor

        new = {lens.lens_id: source(lens, group) for lens in group.lenses}
        stale = [
            lens.lens_id
            for lens in self.group.lenses
            if new.get(lens.lens_id) != source(lens, self.group)
        ]
        self.group = group
        self.paths = group_paths(group)
        for lens_id in stale:
            self.host.take(lens_id)
            self.failed.clear(lens_id)
        busy = await self._retire_idle(set(stale))
        if busy:
            task = asyncio.ensure_future(self._retire(busy))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return stale

    async def _retire_idle(self, lens_ids: set[str]) -> set[str]:
        """Evict those of `lens_ids` that are idle, under Serve's lock; return the others."""
        resident = {r.lens_id: r for r in self.slots.resident()}
        held = {lens_id for lens_id in lens_ids if lens_id in resident}
        idle = [lens_id for lens_id in held if resident[lens_id].users == 0]
        if idle and not self.slots.is_locked():
            async with self.slots.locked():
                await self.slots.evict_chosen(idle)
            for lens_id in idle:
                self.host.take(lens_id)  # the eviction parked it there: drop it
            self._on_change()
            held -= set(idle)
        return held

    async def _retire(self, pending: set[str]) -> None:
        """Evict these lenses from the device as each goes idle."""
        while pending:
            await asyncio.sleep(RETIRE_POLL_SECONDS)
            pending = await self._retire_idle(pending)

    # -- donors ----------------------------------------------------------------------------

    def _pinned_donors(self) -> set[Path]:
        return {r.lens.donor.path for r in self.slots.resident() if r.lens.donor is not None}

    async def _donor_for(self, spec: LensSpec) -> Base | None:
        if spec.donor is None:
            return None
        path = Path(self.group.donor(spec.donor).path)
        return await self.donors.get(path, pinned=self._pinned_donors())

    async def _load_donor(self, path: Path) -> Base:
        started = time.perf_counter()
        donor = await asyncio.to_thread(load_base, path, dtype=self.group.dtype, device=self.device)
        seconds = time.perf_counter() - started
        self.metrics.donor_load_seconds.observe(seconds)
        self._log_event("donor_load", None, donor=self.donor_id(path), seconds=seconds,
                        bytes=donor.nbytes)  # fmt: skip
        return donor

    def _drop_donor(self, path: Path, donor: Base) -> None:
        # Host-tier lenses hold a reference to their donor; drop them with it, or the
        # donor's memory would stay in use.
        dropped = self.host.drop_where(lambda lens: lens.donor is donor)
        self._log_event("donor_drop", None, donor=self.donor_id(path), dropped_from_host=dropped)

    def donor_id(self, path: Path) -> str:
        """Return the group file's id for a donor path (responses never show server paths)."""
        for donor in self.group.donors:
            if Path(donor.path) == path:
                return donor.donor_id
        return path.name

    # -- failures --------------------------------------------------------------------------

    def _lens_spec(self, lens_id: str) -> LensSpec:
        try:
            return self.group.lens(lens_id)
        except KeyError:
            raise BadInput(
                f"lens {lens_id!r} is not in group {self.group.group_id}",
                {"lens_id": lens_id, "group_id": self.group.group_id},
            ) from None

    def _record_failure(self, lens_id: str, exc: LensError) -> None:
        self.metrics.record_failure(exc.code, lens_id)
        delay = self.failed.record(lens_id, exc)
        if delay is not None:
            self._log_event("lens_failed", lens_id, code=exc.code, why=exc.message, retry_in=delay)
            self._on_change()

    def failures(self) -> dict[str, LensFailure]:
        """Failed lenses with their error code and the back-off left."""
        return self.failed.report()

    # -- accounting ------------------------------------------------------------------------

    def device_lens_bytes(self) -> int:
        """Bytes of the lenses on the device."""
        return sum(r.nbytes for r in self.slots.resident())

    def memory_bytes(self, *, extra_lens_bytes: int = 0) -> dict[str, int]:
        """Accounted tensor bytes by kind (the status `memory` without device readings)."""
        return {
            "base_bytes": self.base_bytes,
            "lens_bytes": self.device_lens_bytes() + extra_lens_bytes,
            "donor_bytes": self.donors.nbytes,
            "host_bytes": self.host.nbytes,
        }

    def load_history(self) -> dict[str, LoadStats]:
        """Measured switches by kind (`hit`, `host`, `disk`, `first`)."""
        return {kind: stats.summary() for kind, stats in self.history.items()}


def _name_lens(exc: LensError, lens_id: str, paths: list[Path]) -> None:
    """Make a load failure name its lens, and its files by name, never by server path."""
    message = redact_text(exc.message, paths)
    if lens_id not in message:
        message = f"lens {lens_id}: {message}"
    exc.message = message
    exc.args = (message,)
    exc.detail = {**redact(exc.detail, paths), "lens_id": lens_id}
