"""Batching scheduler of a group replica: concurrent analyses share decode and encode passes.

Between `GroupServer.analyze` and lenscore on the data path (DESIGN §Serving shape,
"Batching across requests"). Each request is a `lenscore.analysis_steps` generator that
yields decode and encode works; the scheduler, on the replica's event loop, packs the
pending works of every request with one `shape_key` (same lens or other lenses of the
group) into one pass of at most `max_rows` rows and hands it to ONE worker thread (torch on
the CPU already uses every core per op). The worker runs the pass (`lenscore.batch
.run_works`), then advances each request whose work is complete to its next work; new
requests are advanced there too (tokenising, activations).

Fairness: the next pass serves the shape key whose pending work has waited longest, and
inside a pass every request gets an equal share of the rows (requests served longest ago
first; leftover rows go round again), so a 5,000-token analysis cannot hold back a 10-token
one. A pass waits up to `max_wait_ms` for requests already inside the replica but not yet
here; with nothing to wait for it starts at once. Each request keeps its own progress
callback, stop flag, seed and options; a stopped request leaves at the next pass boundary
and its rows never touch anyone else's (rows are independent: LENS_FORMAT §Decoding).
The module runs past 400 lines because the request records, the pump and the worker share
state that one class keeps consistent; the row-filling policy (`_fill`, `_fit`) is pure and
would be the piece to move out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from deployments.replica.status import BatchingStats
from lenscore import AnalysisOptions, Cancelled, Lens, OutOfDeviceMemory
from lenscore.analyze import ReadActivations, analysis_steps
from lenscore.batch import Steps, Work, run_works, shape_key

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class BatchSettings:
    """The scheduler's `user_config` part: rows per pass (0: off) and the wait for more."""

    max_rows: int
    max_wait_ms: float

    @property
    def enabled(self) -> bool:
        """Whether analyses go through the scheduler at all."""
        return self.max_rows > 0


@dataclass(eq=False)
class _Request:
    """One analysis inside the scheduler: its generator, its current work and its outcome."""

    steps: Steps
    stop: threading.Event
    future: asyncio.Future
    release: Callable[[], None]
    lens_id: str
    seq: int
    started: bool = False
    work: Work | None = None
    key: tuple | None = None
    since: int = 0  # when `work` became pending (the worker's counter)
    unit_rows: list[int] = field(default_factory=list)  # rows of each unit of `work`
    done_units: int = 0
    parts: list[torch.Tensor] = field(default_factory=list)
    served_at: int = -1  # the last pass that took rows of this request
    outcome: tuple[str, Any] | None = None  # ("result", value) or ("error", exception)
    waiting: bool = True  # the caller still awaits the future
    returning: bool = False  # finished; counted in `_returning` until the caller resumes

    def remaining(self) -> int:
        """Units of the current work not yet run."""
        return len(self.unit_rows) - self.done_units


@dataclass
class _Unit:
    """One hand-over to the worker: requests to start, or pieces of works for one pass."""

    starts: list[_Request] = field(default_factory=list)
    pieces: list[tuple[_Request, int, int]] = field(default_factory=list)  # (req, first, end)
    rows: int = 0
    lenses: int = 0
    error: BaseException | None = None  # the pass's own failure (e.g. a device OOM)


class BatchScheduler:
    """Packs rows of concurrent analyses into shared passes, one pass at a time."""

    def __init__(
        self,
        settings: BatchSettings,
        *,
        read_activations: ReadActivations | None = None,
        expected: Callable[[], int] = lambda: 0,
        on_change: Callable[[], None] = lambda: None,
        run_pass: Callable[[list[Work]], list[torch.Tensor]] = run_works,
    ) -> None:
        """Start idle; the worker thread and the pump start with the first request.

        Args:
            settings: rows per pass and the wait for more.
            read_activations: the replica's activation cache reader (default: no cache).
            expected: requests inside the replica that may soon bring rows (a pass waits
                up to `max_wait_ms` while this is above the ones already here).
            on_change: called when the requests held change (status).
            run_pass: `lenscore.batch.run_works`; a test seam for injecting a device OOM.

        """
        self.settings = settings
        self._read = read_activations
        self._expected = expected
        self._on_change = on_change
        self._run_pass = run_pass
        self._requests: list[_Request] = []
        self._seq = itertools.count()
        self._since = itertools.count()  # advanced only by the worker thread
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lens-batch")
        self._pump: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._row_cap = settings.max_rows  # halved after a device OOM until idle
        self._passes = 0
        self._rows = 0
        self._shared_passes = 0
        self._multi_lens_passes = 0
        self._finished = 0
        self._returning = 0  # finished requests whose callers have not resumed yet

    # -- requests --------------------------------------------------------------------------

    async def analyze(
        self,
        lens: Lens,
        *,
        text: str | None,
        messages: list[dict[str, Any]] | None,
        options: AnalysisOptions,
        stop: threading.Event,
        on_progress: Callable[[int, int], None] | None = None,
        hold: Callable[[], None] = lambda: None,
        release: Callable[[], None] = lambda: None,
        free_memory: Callable[[], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """Run one analysis through shared passes; `lenscore.analyze`'s result and errors.

        `hold`/`release` keep the lens on the device while the scheduler holds the request,
        which may outlive a cancelled caller until the pass it is in ends. With
        `free_memory`, a device OOM frees memory and runs the analysis once more with half
        the batch size (DESIGN §Serving shape, "Off the event loop").

        Raises:
            OutOfDeviceMemory: the retry ran out of memory too (or there was none).

        """
        request = {"lens": lens, "text": text, "messages": messages, "stop": stop,
                   "on_progress": on_progress, "hold": hold, "release": release}  # fmt: skip
        try:
            return await self._submit(options=options, **request)
        except OutOfDeviceMemory:
            if free_memory is None:
                raise
            await free_memory()
        half = dataclasses.replace(options, batch_size=max(1, (options.batch_size or 2) // 2))
        try:
            return await self._submit(options=half, **request)
        except OutOfDeviceMemory as exc:
            raise OutOfDeviceMemory(
                f"out of device memory with lens {lens.lens_id}, also after freeing idle "
                "lenses; retry later or with a shorter text",
                {"lens_id": lens.lens_id},
            ) from exc

    async def _submit(
        self,
        lens: Lens,
        text: str | None,
        messages: list[dict[str, Any]] | None,
        options: AnalysisOptions,
        stop: threading.Event,
        on_progress: Callable[[int, int], None] | None,
        hold: Callable[[], None],
        release: Callable[[], None],
    ) -> dict[str, Any]:
        steps = analysis_steps(
            lens,
            text=text,
            messages=messages,
            options=options,
            on_progress=on_progress,
            should_stop=stop.is_set,
            read_activations=self._read,
        )
        loop = asyncio.get_running_loop()
        request = _Request(steps, stop, loop.create_future(), release, lens.lens_id,
                           next(self._seq))  # fmt: skip
        request.future.add_done_callback(_retrieve)
        hold()
        self._requests.append(request)
        self._on_change()
        self._ensure_pump(loop)
        try:
            return await asyncio.shield(request.future)
        except asyncio.CancelledError:
            stop.set()
            self._poke()
            raise
        finally:
            request.waiting = False
            if request.returning:
                self._returning -= 1

    @property
    def busy(self) -> int:
        """Requests held (a cancelled one until the pass it is in ends)."""
        return len(self._requests)

    def reconfigure(self, settings: BatchSettings) -> None:
        """Apply new settings from the next pass on.

        0 rows: new requests run unbatched; those already here finish at the old size.
        """
        self.settings = settings
        if settings.max_rows > 0:
            self._row_cap = settings.max_rows
        self._poke()

    def stats(self) -> BatchingStats:
        """Counters for the replica status."""
        return BatchingStats(
            max_rows=self.settings.max_rows,
            max_wait_ms=self.settings.max_wait_ms,
            passes=self._passes,
            rows=self._rows,
            shared_passes=self._shared_passes,
            multi_lens_passes=self._multi_lens_passes,
            requests=self._finished,
            queued_requests=len(self._requests),
            mean_rows_per_pass=round(self._rows / self._passes, 3) if self._passes else 0.0,
        )

    # -- the pump (event loop) -------------------------------------------------------------

    def _ensure_pump(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._pump is not None and not self._pump.done() and self._pump.get_loop() is loop:
            self._poke()
            return
        self._wake = asyncio.Event()
        self._pump = loop.create_task(self._run_pump())

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run_pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._requests:
            try:
                await self._step(loop)
            except Exception as exc:  # noqa: BLE001 - a scheduler bug must not hang requests
                log.exception("batching scheduler failed; failing the requests it held")
                for request in list(self._requests):
                    request.outcome = request.outcome or ("error", exc)
                    self._finish(request)
        if self.settings.max_rows > 0:
            self._row_cap = self.settings.max_rows

    async def _step(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drop stopped requests, wait for more rows if useful, run one unit, settle it."""
        self._drop_stopped()
        if not self._requests:
            return
        if all(r.started for r in self._requests):
            await self._gather(loop)
        unit = self._plan()
        await loop.run_in_executor(self._executor, self._execute, unit)
        self._settle(unit)

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait up to `max_wait_ms` for requests inside the replica that are not here yet."""
        wait_s = self.settings.max_wait_ms / 1000
        deadline = loop.time() + wait_s
        while wait_s > 0 and self._expected() > len(self._requests) + self._returning:
            if self._pending_rows() >= self._row_cap or loop.time() >= deadline:
                return
            if any(not r.started or r.stop.is_set() for r in self._requests):
                return
            if self._wake is None:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
            except TimeoutError:
                return

    def _pending_rows(self) -> int:
        return sum(sum(r.unit_rows[r.done_units :]) for r in self._requests if r.work is not None)

    def _drop_stopped(self) -> None:
        for request in [r for r in self._requests if r.stop.is_set()]:
            request.steps.close()
            name = request.lens_id
            request.outcome = ("error", Cancelled(f"analysis with lens {name} cancelled"))
            self._finish(request)

    def _plan(self) -> _Unit:
        starts = [r for r in self._requests if not r.started]
        if starts:
            for request in starts:
                request.started = True
            return _Unit(starts=starts)
        oldest = min((r for r in self._requests if r.work is not None), key=lambda r: r.since)
        members = [r for r in self._requests if r.work is not None and r.key == oldest.key]
        pieces = self._fill(members)
        rows = sum(sum(r.unit_rows[a:b]) for r, a, b in pieces)
        lenses = len({id(r.work.lens) for r, _, _ in pieces if r.work is not None})
        return _Unit(pieces=pieces, rows=rows, lenses=lenses)

    def _fill(self, members: list[_Request]) -> list[tuple[_Request, int, int]]:
        """Take rows for one pass: an equal share each, then leftovers round again.

        Requests served longest ago go first. A unit larger than the whole pass (best-of-k
        with k above `max_rows`) runs alone.
        """
        cap = max(self._row_cap, 1)
        budget = cap
        taken = {id(r): 0 for r in members}
        order = sorted(members, key=lambda r: (r.served_at, r.seq))
        greedy = False
        while budget > 0:
            hungry = [r for r in order if r.remaining() > taken[id(r)]]
            if not hungry:
                break
            share = budget if greedy else max(budget // len(hungry), 1)
            moved = False
            for request in hungry:
                first = request.done_units + taken[id(request)]
                units, rows = _fit(request.unit_rows, first, min(share, budget))
                if units == 0 and budget == cap:
                    units, rows = 1, request.unit_rows[first]
                taken[id(request)] += units
                budget -= rows
                moved = moved or units > 0
                if budget <= 0:
                    break
            if not moved:
                if greedy:
                    break
                greedy = True
        return [(r, r.done_units, r.done_units + taken[id(r)]) for r in order if taken[id(r)] > 0]

    def _settle(self, unit: _Unit) -> None:
        """Back on the event loop: count the pass, finish requests that are done."""
        if unit.pieces and unit.error is None:
            self._passes += 1
            self._rows += unit.rows
            self._shared_passes += len(unit.pieces) > 1
            self._multi_lens_passes += unit.lenses > 1
            for request, _, _ in unit.pieces:
                request.served_at = self._passes
        if isinstance(unit.error, torch.OutOfMemoryError):
            self._row_cap = max(unit.rows // 2, 1)
        for request in list(self._requests):
            if request.outcome is not None:
                self._finish(request)

    def _finish(self, request: _Request) -> None:
        self._requests.remove(request)
        request.release()
        self._finished += 1
        kind, value = request.outcome or ("error", RuntimeError("no outcome"))
        if request.waiting:
            request.returning = True
            self._returning += 1
        if not request.future.done():
            if kind == "result":
                request.future.set_result(value)
            else:
                request.future.set_exception(value)
        self._on_change()

    # -- the worker thread -----------------------------------------------------------------

    def _execute(self, unit: _Unit) -> None:
        """Run one unit: start requests, or run a pass and advance whoever it completed."""
        for request in unit.starts:
            self._advance(request, None)
        if not unit.pieces:
            return
        works = [r.work.take(a, b) for r, a, b in unit.pieces]  # type: ignore[union-attr]
        try:
            results = self._run_pass(works)
        except Exception as exc:  # noqa: BLE001 - raised inside each request of the pass
            # A device OOM becomes OutOfDeviceMemory in lenscore and `analyze` retries with
            # half the batch; the next passes are smaller too.
            unit.error = exc
            for request, _, _ in unit.pieces:
                self._advance(request, exc)
            return
        for (request, _, end), result in zip(unit.pieces, results, strict=True):
            request.parts.append(result)
            request.done_units = end
            if request.remaining() == 0:
                parts = request.parts
                self._advance(request, parts[0] if len(parts) == 1 else torch.cat(parts))

    def _advance(self, request: _Request, value: Any) -> None:
        """Send `value` (or throw an exception) into the request and take its next work."""
        try:
            if isinstance(value, BaseException):
                work = request.steps.throw(value)
            elif value is None:
                work = next(request.steps)
            else:
                work = request.steps.send(value)
            while work.units == 0:  # nothing to share: an empty work runs at once
                work = request.steps.send(work.run_alone())
        except StopIteration as stop:
            request.work, request.outcome = None, ("result", stop.value)
            return
        except Exception as exc:  # noqa: BLE001 - the request's own error, raised to its caller
            request.work, request.outcome = None, ("error", exc)
            return
        request.work, request.key = work, shape_key(work)
        request.since = next(self._since)
        request.unit_rows = work.unit_rows()
        request.done_units = 0
        request.parts = []


def _retrieve(future: asyncio.Future) -> None:
    # A cancelled caller never reads its request's error; read it so asyncio does not log
    # "exception was never retrieved".
    if not future.cancelled():
        future.exception()


def _fit(unit_rows: list[int], first: int, budget: int) -> tuple[int, int]:
    """Units from `first` whose rows fit in `budget`, and those rows."""
    units = rows = 0
    for size in unit_rows[first:]:
        if rows + size > budget:
            break
        units += 1
        rows += size
    return units, rows


def settings_of(replica: Any) -> BatchSettings:
    """BatchSettings from a `ReplicaSpec`."""
    return BatchSettings(max_rows=replica.batch_max_rows, max_wait_ms=replica.batch_max_wait_ms)
