"""Request execution on a replica: torch work off the event loop, counted, cancellable.

Between `GroupServer`'s request methods and lenscore: a request holds its lens for as long as
any of its threads runs (so eviction waits), a cancelled request stops its work at the next
check of `stop`, and a device OOM frees idle lenses and retries once (STYLE §4).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import torch

from deployments.replica.residency import LensResidency, Switch
from deployments.replica.tiers import ResidentLens
from lenscore import OutOfDeviceMemory

T = TypeVar("T")


class Execution:
    """Counts requests inside the replica and runs their torch work in threads."""

    def __init__(self, residency: LensResidency, on_change: Callable[[], None]) -> None:
        self.residency = residency
        self.in_flight = 0
        self.busy_threads = 0  # torch threads still running, cancelled requests' included
        self._on_change = on_change

    @contextlib.asynccontextmanager
    async def using(self, lens_id: str) -> AsyncIterator[tuple[ResidentLens, Switch]]:
        """Count one request in flight and hold its lens on the device for its duration."""
        self.in_flight += 1
        self._on_change()
        try:
            resident, switch = await self.residency.acquire(lens_id)
            try:
                yield resident, switch
            finally:
                resident.release()
        finally:
            self.in_flight -= 1
            self._on_change()

    async def run(self, resident: ResidentLens, work: Callable[[], T], stop: threading.Event) -> T:
        """Run torch work in a thread; the lens stays counted in use until the thread ends.

        A cancelled request (client gone) sets `stop`, which lenscore checks between
        batches or tokens; the thread's own user count keeps the lens on the device until it
        returns.
        """
        resident.hold()
        self.busy_threads += 1
        future = asyncio.ensure_future(asyncio.to_thread(work))
        future.add_done_callback(lambda done: self._work_done(resident, done))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            raise

    def _work_done(self, resident: ResidentLens, done: asyncio.Future) -> None:
        resident.release()
        self.busy_threads -= 1
        _consume(done)
        self._on_change()

    async def run_with_oom_retry(
        self,
        resident: ResidentLens,
        first: Callable[[], T],
        retry: Callable[[], T],
        stop: threading.Event,
        *,
        advice: str,
    ) -> T:
        """Run `first`; on a device OOM evict idle lenses and run `retry` (a smaller batch).

        Raises:
            OutOfDeviceMemory: the retry ran out of memory too; `advice` says what to change.

        """
        try:
            return await self.run(resident, first, stop)
        # lenscore reports a device OOM as OutOfDeviceMemory; a raw torch error can still
        # come from code outside lenscore's try (e.g. a host-tier copy back to the device).
        except (torch.OutOfMemoryError, OutOfDeviceMemory):
            await self.residency.free_device_memory(keep=resident.lens_id)
        try:
            return await self.run(resident, retry, stop)
        except (torch.OutOfMemoryError, OutOfDeviceMemory) as exc:
            raise OutOfDeviceMemory(
                f"out of device memory with lens {resident.lens_id}, also after freeing idle "
                f"lenses; {advice}",
                {"lens_id": resident.lens_id},
            ) from exc


async def drain(events: asyncio.Queue, task: asyncio.Future) -> AsyncIterator[dict[str, Any]]:
    """Yield queued events until `task` ends, then whatever is left in the queue."""
    while not task.done():
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
        else:
            getter.cancel()
    while not events.empty():
        yield events.get_nowait()


def _consume(future: asyncio.Future) -> None:
    # Retrieve the exception of a thread whose request was cancelled, so asyncio does not
    # log "exception was never retrieved" for work nobody waits on any more.
    if not future.cancelled():
        future.exception()
