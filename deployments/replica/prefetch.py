"""Reading lenses ahead of the device copy: disk reads off Serve's lock, predictive prefetch.

Below `replica/residency.py` on the data path (DESIGN §Serving shape, "Preloading").
`ReadAhead` starts a lens's disk read as soon as a request for it arrives, before the request
waits for Serve's multiplex lock, so several lenses are read and deserialised at once and
only their device copies take turns. `Prefetcher` counts lens-to-lens transitions of this
replica's requests and, while the replica is idle, reads the likely next lenses into the
host tier within its byte budget (`predictive_prefetch` in `user_config`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch

from deployments.config import GroupSpec
from deployments.replica.failures import LoadFailures
from deployments.replica.multiplex import DeviceSlots
from deployments.replica.status import PrefetchCounts
from deployments.replica.tiers import DonorCache, HostTier
from lenscore import Base, Lens, LensError, RawCheckpoint, load_lens

log = logging.getLogger("ray.serve")

# A replica counts as idle once no request has arrived for this long and none is running.
IDLE_SECONDS = 0.05
# Prefetch the next lenses whose share of the transitions out of the current one is at least
# this, most likely first, at most this many per idle spell.
MIN_SHARE = 0.2
MAX_LENSES = 2
# Reads at once: a few more than cores, as a read waits on the disk part of its time.
READ_THREADS = min(8, (os.cpu_count() or 1) + 4)

ReadLens = Callable[[str], tuple[Path, RawCheckpoint]]


@dataclasses.dataclass(eq=False)
class PendingRead:
    """One lens's disk read, shared by every request (and the prefetcher) that needs it."""

    lens_id: str
    task: asyncio.Future[tuple[Path, RawCheckpoint]]
    waiters: int = 0
    claimed: bool = False  # a load (or the prefetcher) took the result: never cancelled


class ReadAhead:
    """Disk reads started when a request arrives, before it waits for the multiplex lock.

    A read runs in a thread and yields `(checkpoint, RawCheckpoint)` with the tensors in
    memory the process owns. The load under the lock claims it; a read nobody claims is
    dropped when its last waiter leaves (a cancelled request).

    Reads run in their own threads: in the loop's default pool, a preload of many lenses
    queued the device step of the first lens read behind the reads of all the others.
    """

    def __init__(self, read: ReadLens, *, threads: int = READ_THREADS) -> None:
        self.read = read  # a seam: tests count or slow down reads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lens-read")
        self.acquiring = 0  # requests between arriving and holding their lens
        self.started = 0  # reads started, for status and tests
        self._reads: dict[str, PendingRead] = {}

    def __contains__(self, lens_id: object) -> bool:
        return lens_id in self._reads

    def join(self, lens_id: str) -> PendingRead:
        """Wait for the lens's read, starting it unless one is already running."""
        pending = self._reads.get(lens_id)
        if pending is None:
            task = asyncio.get_running_loop().run_in_executor(self._pool, self.read, lens_id)
            task.add_done_callback(_consume)
            pending = self._reads[lens_id] = PendingRead(lens_id, task)
            self.started += 1
        pending.waiters += 1
        return pending

    def leave(self, pending: PendingRead) -> None:
        """Stop waiting; the last waiter of an unclaimed read drops it."""
        pending.waiters -= 1
        if (
            pending.waiters <= 0
            and not pending.claimed
            and self._reads.get(pending.lens_id) is pending
        ):
            del self._reads[pending.lens_id]
            pending.task.cancel()  # the thread finishes; its result is dropped

    def claim(self, lens_id: str) -> PendingRead | None:
        """Take the lens's running read for a load; `done` forgets it afterwards."""
        pending = self._reads.get(lens_id)
        if pending is None or pending.claimed:
            return None
        pending.claimed = True
        return pending

    def claim_own(self, pending: PendingRead) -> bool:
        """Take a read that this caller joined, unless a load already took it."""
        if pending.claimed or self._reads.get(pending.lens_id) is not pending:
            return False
        pending.claimed = True
        self.done(pending)
        return True

    def done(self, pending: PendingRead) -> None:
        """Forget a claimed read (its result has been used)."""
        if self._reads.get(pending.lens_id) is pending:
            del self._reads[pending.lens_id]

    @contextlib.asynccontextmanager
    async def request(self, lens_id: str, *, read: bool) -> AsyncIterator[None]:
        """Count one arriving request; with `read`, start (or share) its lens's read."""
        self.acquiring += 1
        pending = self.join(lens_id) if read else None
        try:
            yield
        finally:
            self.acquiring -= 1
            if pending is not None:
                self.leave(pending)


class LensResidency(Protocol):
    """What the prefetcher reads of the replica's residency (`replica/residency.py`).

    A protocol, so this module sits below residency without importing it.
    """

    group: GroupSpec
    base: Base
    device: torch.device
    slots: DeviceSlots
    host: HostTier
    donors: DonorCache
    read_ahead: ReadAhead
    failed: LoadFailures


class Transitions:
    """How often a request for lens B followed one for lens A on this replica."""

    def __init__(self) -> None:
        self.last: str | None = None
        self._counts: dict[str, Counter[str]] = {}

    def record(self, lens_id: str) -> None:
        """Count the step from the previous request's lens to this one (repeats aside)."""
        if self.last is not None and self.last != lens_id:
            self._counts.setdefault(self.last, Counter())[lens_id] += 1
        self.last = lens_id

    def shares(self, lens_id: str) -> dict[str, float]:
        """Next lens -> its share of the transitions out of `lens_id`."""
        counts = self._counts.get(lens_id)
        if not counts:
            return {}
        total = sum(counts.values())
        return {next_id: n / total for next_id, n in counts.items()}


class Prefetcher:
    """While the replica is idle, read the lenses likely requested next into the host tier.

    The host tier's budget covers prefetch reads in progress (`HostTier.reserved_bytes`),
    and a prefetch makes room only by dropping host-tier lenses that are less likely to be
    next than the one it reads. Donor lenses are prefetched only while their donor is held.
    """

    def __init__(
        self,
        residency: LensResidency,
        *,
        enabled: bool,
        on_change: Callable[[], None],
        log_event: Callable[..., None],
    ) -> None:
        self.residency = residency
        self.enabled = enabled
        self._on_change = on_change
        self._log_event = log_event
        self.transitions = Transitions()
        self.counts: Counter[str] = Counter()
        self._marks: dict[str, Lens] = {}  # lens id -> the Lens object a prefetch put there
        self._sizes: dict[str, int] = {}  # lens id -> bytes, from earlier loads
        self._last_request = 0.0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy = False

    # -- hooks called by the residency ------------------------------------------------------

    def notice(self, lens_id: str) -> None:
        """Count a request's lens and, when on, plan a prefetch for the next idle spell."""
        self.transitions.record(lens_id)
        self._last_request = time.monotonic()
        if not self.enabled:
            return
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def used(self, lens_id: str, lens: Lens) -> bool:
        """Tell whether a lens leaving the host tier is one a prefetch put there (counted)."""
        if self._marks.get(lens_id) is not lens:
            return False
        del self._marks[lens_id]
        self.counts["hits"] += 1
        return True

    def configure(self, enabled: bool) -> None:
        """Turn prefetching on or off (`user_config`); off cancels a running prefetch."""
        self.enabled = enabled
        if not enabled and self._task is not None:
            self._task.cancel()
            self._task = None

    def report(self) -> PrefetchCounts:
        """Counters for the replica status."""
        self._prune()
        return PrefetchCounts(
            enabled=self.enabled,
            reads_started=self.residency.read_ahead.started,
            **{k: self.counts[k] for k in ("prefetched", "hits", "unused", "no_room", "failed")},
        )

    async def settle(self, timeout: float = 30.0) -> None:
        """Wait until a planned prefetch has run (benches and tests; polls)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            planned = self._wake is not None and self._wake.is_set() and self.enabled
            if not planned and not self._busy:
                return
            await asyncio.sleep(IDLE_SECONDS / 5)

    # -- the idle loop ----------------------------------------------------------------------

    def is_idle(self) -> bool:
        """No request is arriving, loading or running on this replica."""
        residency = self.residency
        return (
            residency.read_ahead.acquiring == 0
            and not residency.slots.is_locked()
            and all(r.users == 0 for r in residency.slots.resident())
        )

    async def _run(self) -> None:
        wake = self._wake
        while self.enabled and wake is not None:
            await wake.wait()
            while not (self.is_idle() and time.monotonic() - self._last_request >= IDLE_SECONDS):
                await asyncio.sleep(IDLE_SECONDS)
            wake.clear()
            self._busy = True
            try:
                await self._round()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad round
                log.exception("prefetch round failed; prefetching goes on")
            finally:
                self._busy = False

    async def _round(self) -> None:
        residency = self.residency
        last = self.transitions.last
        if last is None:
            return
        shares = self.transitions.shares(last)
        ranked = sorted(shares.items(), key=lambda item: -item[1])
        self._learn_sizes()
        for lens_id, share in [c for c in ranked if c[1] >= MIN_SHARE][:MAX_LENSES]:
            if (self._wake is not None and self._wake.is_set()) or not self.is_idle():
                return  # a request arrived: it comes first
            if lens_id in residency.slots or lens_id in residency.host:
                continue
            if lens_id in residency.failed or lens_id in residency.read_ahead:
                continue
            nbytes = self._sizes.get(lens_id)
            if nbytes is None or not self._make_room(nbytes, share, shares):
                self.counts["no_room"] += nbytes is not None
                continue
            await self._fetch(lens_id, nbytes)

    def _learn_sizes(self) -> None:
        for resident in self.residency.slots.resident():
            self._sizes[resident.lens_id] = resident.nbytes
        self._sizes.update(self.residency.host.sizes())

    def _make_room(self, nbytes: int, share: float, shares: dict[str, float]) -> bool:
        """Drop host-tier lenses less likely next than this one until `nbytes` fit."""
        host = self.residency.host
        free = host.capacity_bytes - host.nbytes - host.reserved_bytes
        if free >= nbytes:
            return True
        sizes = host.sizes()
        victims = [x for x in host.lens_ids() if shares.get(x, 0.0) < share]  # LRU first
        if free + sum(sizes[x] for x in victims) < nbytes:
            return False
        for lens_id in victims:
            if free >= nbytes:
                break
            host.take(lens_id)
            free += sizes[lens_id]
        return True

    async def _fetch(self, lens_id: str, nbytes: int) -> None:
        residency = self.residency
        started = time.perf_counter()
        residency.host.reserved_bytes += nbytes
        try:
            lens = await self._read_to_host(lens_id)
        finally:
            residency.host.reserved_bytes -= nbytes
        if lens is None or lens_id in residency.slots or lens_id in residency.host:
            return  # failed, or a request loaded it meanwhile
        dropped = residency.host.put(lens)
        if lens_id not in dropped:
            self._marks[lens_id] = lens
            self.counts["prefetched"] += 1
        self._log_event("lens_prefetch", lens_id, seconds=time.perf_counter() - started,
                        bytes=lens.nbytes, dropped_from_host=dropped)  # fmt: skip
        self._on_change()

    async def _read_to_host(self, lens_id: str) -> Lens | None:
        """Read a lens (sharing a request's read) and build it on the host; None if not."""
        residency = self.residency
        try:
            spec = residency.group.lens(lens_id)
            donor = await self._held_donor(spec.donor)
        except KeyError:
            return None  # the group file changed
        if spec.donor is not None and donor is None:
            return None
        pending = residency.read_ahead.join(lens_id)
        try:
            checkpoint, raw = await asyncio.shield(pending.task)
            owned = residency.read_ahead.claim_own(pending)  # before leaving: keeps it alive
        except LensError as exc:
            self.counts["failed"] += 1
            log.info("prefetch of lens %s failed: %s", lens_id, exc.message)
            return None
        finally:
            residency.read_ahead.leave(pending)
        if not owned or checkpoint != spec.checkpoint:
            return None  # a request's load took the read, or the lens was re-pointed
        if raw.layer_l != spec.layer:
            return None  # the request that needs it reports the mismatch
        try:
            return await asyncio.to_thread(self._build, spec.lens_id, raw, donor)
        except LensError as exc:
            self.counts["failed"] += 1
            log.info("prefetch of lens %s failed: %s", lens_id, exc.message)
            return None

    def _build(self, lens_id: str, raw: RawCheckpoint, donor: Any) -> Lens:
        residency = self.residency
        lens = load_lens(raw.path, residency.base, donor=donor, lens_id=lens_id, device="cpu",
                         raw=raw)  # fmt: skip
        return lens.to_host(pinned=residency.device.type == "cuda")

    async def _held_donor(self, donor_id: str | None) -> Any:
        if donor_id is None:
            return None
        residency = self.residency
        path = Path(residency.group.donor(donor_id).path)
        if path not in residency.donors.paths():
            return None  # donors load on a request's demand only
        return await residency.donors.get(path, pinned=set())

    def _prune(self) -> None:
        host = self.residency.host
        for lens_id, lens in list(self._marks.items()):
            if host.get(lens_id) is not lens:
                del self._marks[lens_id]
                self.counts["unused"] += 1


def _consume(future: asyncio.Future) -> None:
    # A read nobody awaits any more (its request was cancelled) must not log
    # "exception was never retrieved".
    if not future.cancelled():
        future.exception()
