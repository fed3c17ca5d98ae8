"""GroupServer: one Serve replica of a model group, the base loaded once, lenses multiplexed.

Below the ingress on the data path: it takes the lens id from Serve's multiplexed model id,
brings the lens onto the device (device → host tier → disk, DESIGN §Serving shape) and runs
lenscore off the event loop. Over 400 lines: the switch path (load, evict, budget, failures)
and the request paths share the replica's state, and splitting them would scatter it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.config import GroupSpec, LensSpec, ReplicaConfig
from deployments.metrics import SWITCH_KINDS, ReplicaMetrics
from deployments.registry import get_registry
from deployments.tiers import DonorCache, HostTier, LocalMultiplexer, ResidentLens, read_memory
from lenscore import (
    AnalysisOptions,
    BadInput,
    Base,
    LensError,
    OutOfDeviceMemory,
    analyze,
    generate,
    load_base,
    load_lens,
    read_checkpoint,
)

log = logging.getLogger("ray.serve")

# A failed lens load is retried after this back-off, doubled per failure (or on a preload).
RETRY_AFTER_SECONDS = 5.0
MAX_RETRY_AFTER_SECONDS = 300.0


@dataclasses.dataclass
class _Failure:
    error: LensError
    attempts: int
    retry_at: float


@dataclasses.dataclass
class _Stats:
    count: int = 0
    seconds: float = 0.0
    nbytes: int = 0

    def add(self, seconds: float, nbytes: int) -> None:
        self.count += 1
        self.seconds += seconds
        self.nbytes += nbytes

    def summary(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {
            "count": self.count,
            "mean_seconds": self.seconds / n,
            "mean_bytes": self.nbytes / n,
        }


class GroupServer:
    """One replica of a group: the base once on its device, lenses multiplexed on top.

    Plain class; `deployments/app.py` wraps it with `serve.deployment`. Without a Serve
    replica context (bench/switch.py) it runs in-process with the same LRU contract, and
    every request method takes the lens id as a keyword.
    """

    def __init__(
        self,
        group: GroupSpec,
        *,
        device: str | None = None,
        run_analysis: Callable[..., dict[str, Any]] = analyze,
    ) -> None:
        """Load the base onto this replica's device; lenses load on their first request.

        Args:
            group: the validated group.
            device: force a device (default: the GPU Ray assigned, else CPU).
            run_analysis: `lenscore.analyze`; a test seam for injecting a device OOM.

        """
        self.group = group
        self._analyze = run_analysis
        self.replica = group.replica
        self.replica_id, self._actor_name = _replica_identity()
        self.device = torch.device(device or _pick_device())
        self.metrics = ReplicaMetrics(group.group_id)
        started = time.perf_counter()
        self.base: Base = load_base(group.base_model, dtype=group.dtype, device=self.device)
        self.base_load_seconds = time.perf_counter() - started
        self.base_bytes = self.base.nbytes  # walks every parameter: read it once
        self.base_loads = 1
        self.metrics.base_load_seconds.observe(self.base_load_seconds)
        self.host = HostTier(self.replica.host_cache_bytes)
        self.donors = DonorCache(
            self.replica.max_donors_per_replica, self._load_donor, self._drop_donor
        )
        self.failed: dict[str, _Failure] = {}
        self.switches = dict.fromkeys(SWITCH_KINDS, 0)
        self.loads: dict[str, int] = {}  # lens id -> loads onto the device (any source)
        self.history: dict[str, _Stats] = {}  # switch kind -> time and bytes moved
        self.in_flight = 0
        self.busy_threads = 0  # torch threads still running, cancelled requests' included
        self._registry: Any = None
        self._in_serve = self._actor_name is not None
        self._build_multiplexer(self.replica.max_lenses_per_replica)
        # Report at once: until a replica reports, the ingress sees its group as having none
        # and would count the next request as a cold start.
        self._publish()
        log.info(
            "%s",
            json.dumps(
                {"event": "base_loaded", **self._ids(), "seconds": self.base_load_seconds}
                | {"memory": self.memory()}
            ),
        )

    # -- the multiplexed cache -------------------------------------------------------------

    def _build_multiplexer(self, max_lenses: int) -> None:
        async def load(lens_id: str) -> ResidentLens:
            return await self._load_resident(lens_id)

        if self._in_serve:
            # STYLE §1: the limit comes from config. Serve keeps its LRU wrapper on the
            # function it decorates (`__serve_multiplex_wrapper`, created at the first call):
            # a closure, because a bound method takes no attributes (Ray Serve LLM does the
            # same in LLMServer).
            self._get_lens = serve.multiplexed(max_num_models_per_replica=max_lenses)(load)
            self._mux_holder: Any = load
        else:
            self._mux_holder = LocalMultiplexer(load, max_lenses)
            self._get_lens = self._mux_holder.load_model

    def multiplexer(self) -> Any | None:
        """Return Serve's multiplex wrapper (or the local one); None before the first lens."""
        if isinstance(self._mux_holder, LocalMultiplexer):
            return self._mux_holder
        return getattr(self._mux_holder, "__serve_multiplex_wrapper", None)

    def device_lenses(self) -> list[ResidentLens]:
        """Lenses on the device, least recently used first."""
        mux = self.multiplexer()
        return list(mux.models.values()) if mux is not None else []

    async def _load_resident(self, lens_id: str) -> ResidentLens:
        # Runs under the multiplexer's lock, after Serve evicted its LRU lens if it was full.
        spec = self._lens_spec(lens_id)
        self._check_backoff(lens_id)
        before = self.memory()
        started = time.perf_counter()
        try:
            lens, source = await self._bring_to_device(spec)
        except LensError as exc:
            _name_lens(exc, lens_id)
            self._record_failure(lens_id, exc)
            raise
        seconds = time.perf_counter() - started
        kind = "first" if not self.loads else source
        self.loads[lens_id] = self.loads.get(lens_id, 0) + 1
        self.failed.pop(lens_id, None)
        self.metrics.record_load(source, seconds)
        self.history.setdefault(kind, _Stats()).add(seconds, lens.nbytes)
        resident = ResidentLens(lens, kind=kind, on_evict=self._evict_to_host)
        after = self.memory(extra_lens_bytes=lens.nbytes)
        self._log_event("lens_load", lens_id, kind=kind, source=source, seconds=seconds,
                        bytes=lens.nbytes, memory_before=before, memory_after=after)  # fmt: skip
        self._publish()
        return resident

    async def _bring_to_device(self, spec: LensSpec) -> tuple[Any, str]:
        donor = await self._donor_for(spec)
        held = self.host.take(spec.lens_id)
        if held is not None:
            try:
                await self._make_room(held.nbytes)
                lens = await self._to_device(lambda: held.to(self.device))
            except LensError:
                self.host.put(held)
                raise
            return lens, "host"
        raw = await asyncio.to_thread(read_checkpoint, spec.checkpoint)
        await self._make_room(raw.tensor_bytes)
        lens = await self._to_device(
            lambda: load_lens(
                spec.checkpoint,
                self.base,
                donor=donor,
                lens_id=spec.lens_id,
                device=self.device,
                raw=raw,
            )
        )
        return lens, "disk"

    async def _to_device(self, move: Callable[[], Any]) -> Any:
        """Run a load in a thread; on a device OOM free what is unused and try once more."""
        try:
            return await asyncio.to_thread(move)
        except (torch.OutOfMemoryError, OutOfDeviceMemory):
            await self._free_device_memory()
        try:
            return await asyncio.to_thread(move)
        except (torch.OutOfMemoryError, OutOfDeviceMemory) as exc:
            raise OutOfDeviceMemory(
                "the device has no room for this lens even after evicting unused lenses; "
                "retry later or lower max_lenses_per_replica",
                {"group_id": self.group.group_id, "replica_id": self.replica_id},
            ) from exc

    async def _make_room(self, need_bytes: int, *, strict: bool = True) -> None:
        """Evict LRU lenses until base + donors + lenses + `need_bytes` fit the budget.

        Raises:
            OutOfDeviceMemory: base and donors alone leave no room (only when `strict`).

        """
        budget = self.replica.device_memory_budget_bytes
        if budget is None:
            return
        fixed = self.base_bytes + self.donors.nbytes
        if strict and fixed + need_bytes > budget:
            raise OutOfDeviceMemory(
                f"group {self.group.group_id}: base and donors ({fixed} bytes) plus this lens "
                f"({need_bytes} bytes) exceed device_memory_budget_gb ({budget} bytes)",
                {"budget_bytes": budget, "need_bytes": fixed + need_bytes},
            )
        mux = self.multiplexer()
        while mux is not None and mux.models:
            if fixed + sum(r.nbytes for r in mux.models.values()) + need_bytes <= budget:
                return
            await mux.unload_model_lru()

    async def _free_device_memory(self, keep: str | None = None) -> None:
        """Evict every lens nobody uses (but `keep`) to the host tier; empty the CUDA cache."""
        mux = self.multiplexer()
        if mux is not None:
            idle = [r for r in mux.models.values() if r.users == 0 and r.lens_id != keep]
            for resident in idle:
                # NOTE: no lock: popping is atomic on the loop, and waiting for Serve's lock
                # here could deadlock with an eviction waiting for this request's lens.
                if mux.models.get(resident.lens_id) is resident:
                    del mux.models[resident.lens_id]
                    await resident.__del__()
        if self.device.type == "cuda":
            await asyncio.to_thread(torch.cuda.empty_cache)

    async def _evict_to_host(self, resident: ResidentLens) -> None:
        before = self.memory()
        started = time.perf_counter()
        lens = await asyncio.to_thread(resident.lens.to, "cpu")
        dropped = self.host.put(lens)
        self._log_event("lens_evict", resident.lens_id, seconds=time.perf_counter() - started,
                        bytes=resident.nbytes, dropped_from_host=dropped,
                        memory_before=before, memory_after=self.memory())  # fmt: skip
        self._publish()

    async def _donor_for(self, spec: LensSpec) -> Base | None:
        if spec.donor is None:
            return None
        pinned = {r.lens.donor.path for r in self.device_lenses() if r.lens.donor is not None}
        return await self.donors.get(Path(self.group.donor(spec.donor).path), pinned=pinned)

    async def _load_donor(self, path: Path) -> Base:
        started = time.perf_counter()
        donor = await asyncio.to_thread(load_base, path, dtype=self.group.dtype, device=self.device)
        seconds = time.perf_counter() - started
        self.metrics.donor_load_seconds.observe(seconds)
        self._log_event("donor_load", None, donor=str(path), seconds=seconds, bytes=donor.nbytes)
        return donor

    def _drop_donor(self, path: Path, donor: Base) -> None:
        # Host-tier lenses hold a reference to their donor; drop them with it, or the
        # donor's memory would stay in use.
        dropped = self.host.drop_where(lambda lens: lens.donor is donor)
        self._log_event("donor_drop", None, donor=str(path), dropped_from_host=dropped)

    # -- failures --------------------------------------------------------------------------

    def _lens_spec(self, lens_id: str) -> LensSpec:
        try:
            return self.group.lens(lens_id)
        except KeyError:
            raise BadInput(
                f"lens {lens_id!r} is not in group {self.group.group_id}",
                {"lens_id": lens_id, "group_id": self.group.group_id},
            ) from None

    def _check_backoff(self, lens_id: str) -> None:
        failure = self.failed.get(lens_id)
        if failure is not None and time.monotonic() < failure.retry_at:
            raise copy.copy(failure.error)

    def _record_failure(self, lens_id: str, exc: LensError) -> None:
        self.metrics.record_failure(exc.code, lens_id)
        if isinstance(exc, OutOfDeviceMemory):
            return  # memory frees up; not the lens's fault
        attempts = self.failed[lens_id].attempts + 1 if lens_id in self.failed else 1
        delay = min(RETRY_AFTER_SECONDS * 2 ** (attempts - 1), MAX_RETRY_AFTER_SECONDS)
        self.failed[lens_id] = _Failure(exc, attempts, time.monotonic() + delay)
        self._log_event("lens_failed", lens_id, code=exc.code, why=exc.message, retry_in=delay)
        self._publish()

    # -- using a lens ----------------------------------------------------------------------

    def _request_lens_id(self, lens_id: str | None) -> str:
        lens_id = lens_id or serve.get_multiplexed_model_id()
        if not lens_id:
            raise BadInput("no lens id: call with handle.options(multiplexed_model_id=...)")
        return lens_id

    async def _acquire(self, lens_id: str) -> tuple[ResidentLens, dict[str, Any]]:
        """Bring the lens onto the device and count this request as its user."""
        started = time.perf_counter()
        mux = self.multiplexer()
        was_resident = mux is not None and lens_id in mux.models
        while True:
            resident = await self._get_lens(lens_id)
            # An eviction can only start while no request holds the lens, so this retries
            # at most once per concurrent eviction.
            if resident.try_acquire():
                break
        seconds = time.perf_counter() - started
        kind = "hit" if was_resident else resident.kind
        self.switches[kind] += 1
        self.metrics.record_switch(kind, seconds)
        if kind == "hit":
            self.history.setdefault("hit", _Stats()).add(seconds, 0)
        else:
            # The load published before Serve put the lens in its cache: report it resident.
            self._publish()
        return resident, {"kind": kind, "seconds": seconds}

    @contextlib.asynccontextmanager
    async def _using(self, lens_id: str | None) -> AsyncIterator[tuple[ResidentLens, dict]]:
        lens_id = self._request_lens_id(lens_id)
        self.in_flight += 1
        try:
            resident, switch = await self._acquire(lens_id)
            try:
                yield resident, switch
            finally:
                resident.release()
        finally:
            self.in_flight -= 1

    async def _run(self, resident: ResidentLens, work: Callable[[], Any], stop: threading.Event):
        """Run torch work in a thread; the lens stays counted in use until the thread ends.

        A cancelled request (client gone) sets `stop`, which lenscore checks between
        batches; the thread's own user count keeps the lens on the device until it returns.
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
        if self.in_flight == 0:
            self._publish()  # the group status shows the replica idle without waiting

    async def _run_with_oom_retry(
        self,
        resident: ResidentLens,
        options: AnalysisOptions,
        work: Callable[[AnalysisOptions], Any],
        stop: threading.Event,
    ) -> Any:
        try:
            return await self._run(resident, lambda: work(options), stop)
        # lenscore reports a device OOM as OutOfDeviceMemory; a raw torch error can still
        # come from code outside lenscore's try (e.g. a host-tier copy back to the device).
        except (torch.OutOfMemoryError, OutOfDeviceMemory):
            await self._free_device_memory(keep=resident.lens_id)
        half = dataclasses.replace(options, batch_size=max(1, (options.batch_size or 2) // 2))
        try:
            return await self._run(resident, lambda: work(half), stop)
        except (torch.OutOfMemoryError, OutOfDeviceMemory) as exc:
            raise OutOfDeviceMemory(
                f"out of device memory analysing with lens {resident.lens_id}, also at batch "
                f"size {half.batch_size}; retry later or with a shorter text",
                {"lens_id": resident.lens_id, "batch_size": half.batch_size},
            ) from exc

    def _options(self, body: dict[str, Any], lens_id: str) -> AnalysisOptions:
        options = AnalysisOptions.from_dict(body.get("options"))
        if options.batch_size is None:
            options = dataclasses.replace(options, batch_size=self._lens_spec(lens_id).batch_size)
        return options

    # -- request methods -------------------------------------------------------------------

    async def analyze(self, body: dict[str, Any], *, lens_id: str | None = None) -> dict:
        """Analyse `text` or `messages` with the request's lens (DESIGN §Response shapes)."""
        stop = threading.Event()
        async with self._using(lens_id) as (resident, switch):
            options = self._options(body, resident.lens_id)
            started = time.perf_counter()

            def work(opts: AnalysisOptions) -> dict:
                return self._analyze(resident.lens, text=body.get("text"),
                               messages=body.get("messages"), options=opts,
                               should_stop=stop.is_set)  # fmt: skip

            result = await self._run_with_oom_retry(resident, options, work, stop)
        self.metrics.record_analysis(time.perf_counter() - started, len(result["rows"]))
        result["meta"].update(self._ids(), switch=switch)
        return result

    async def analyze_stream(
        self, body: dict[str, Any], *, lens_id: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield progress events, then `meta`, one `row` per token, then `done`.

        Closing the generator (the consumer went away) stops the analysis between batches.
        """
        stop = threading.Event()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_progress(done: int, total: int) -> None:
            event = {"event": "progress", "done": done, "total": total}
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            async with self._using(lens_id) as (resident, switch):
                options = self._options(body, resident.lens_id)
                started = time.perf_counter()

                def work() -> dict:
                    return self._analyze(resident.lens, text=body.get("text"),
                                   messages=body.get("messages"), options=options,
                                   on_progress=on_progress, should_stop=stop.is_set)  # fmt: skip

                task = asyncio.ensure_future(self._run(resident, work, stop))
                async for event in _drain(events, task):
                    yield event
                result = task.result()
        finally:
            stop.set()
        self.metrics.record_analysis(time.perf_counter() - started, len(result["rows"]))
        yield {"event": "meta", "meta": {**result["meta"], **self._ids(), "switch": switch}}
        for row in result["rows"]:
            yield {"event": "row", "row": row}
        yield {"event": "done"}

    async def generate(self, body: dict[str, Any], *, lens_id: str | None = None) -> dict:
        """Continue `text`/`messages` with the lens's activation model (donor or base)."""
        stop = threading.Event()
        async with self._using(lens_id) as (resident, switch):

            def work() -> dict:
                return generate(
                    resident.lens,
                    text=body.get("text"),
                    messages=body.get("messages"),
                    max_new_tokens=body.get("max_new_tokens", 32),
                    temperature=body.get("temperature", 1.0),
                    seed=body.get("seed"),
                    num_continuations=body.get("num_continuations", 1),
                )

            result = await self._run(resident, work, stop)
        result["meta"].update(self._ids(), switch=switch)
        return result

    async def ensure_lens(self, *, lens_id: str | None = None) -> dict[str, Any]:
        """Bring the lens onto the device (preload); a failed lens is retried now."""
        lens_id = self._request_lens_id(lens_id)
        self.failed.pop(lens_id, None)
        async with self._using(lens_id) as (resident, switch):
            nbytes = resident.nbytes
        return {"lens_id": lens_id, "replica_id": self.replica_id, "bytes": nbytes, **switch}

    # -- control ---------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply cache sizes (ReplicaConfig) live: evict or grow without a restart."""
        config = ReplicaConfig.model_validate(user_config or {})
        self.replica = config.apply_to(self.group.replica)
        n = self.replica.max_lenses_per_replica
        mux = self.multiplexer()
        if mux is None:
            self._build_multiplexer(n)  # no lens yet: nothing to keep
        else:
            # NOTE: Serve's wrapper evicts one model per load when full, so shrinking it
            # needs the extra evictions here; its lock keeps loads out meanwhile.
            mux.max_num_models_per_replica = n
            async with mux._model_cache_lock:
                while len(mux.models) > n:
                    await mux.unload_model_lru()
                await self._make_room(0, strict=False)
        self.host.resize(self.replica.host_cache_bytes)
        self.donors.max_donors = self.replica.max_donors_per_replica
        pinned = {r.lens.donor.path for r in self.device_lenses() if r.lens.donor is not None}
        self.donors.trim(self.donors.max_donors, pinned=pinned)
        self._log_event("reconfigure", None, replica=self.replica.model_dump(mode="json"))
        self._publish()

    async def check_health(self) -> None:
        """Answer Serve's health check; also re-push this replica's status to the registry."""
        if self._in_serve:
            self._registry = get_registry()
            self._publish()

    async def status(self) -> dict[str, Any]:
        """Return this replica's entry of the group status (DESIGN §Response shapes)."""
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """Build the status dict on the event loop, without waiting."""
        device_ids = [r.lens_id for r in self.device_lenses()]
        memory = self.memory()
        self.metrics.record_memory(memory)
        self.metrics.record_residency(len(device_ids), len(self.host.lens_ids()))
        return {
            **self._ids(),
            "actor_name": self._actor_name,
            "device": str(self.device),
            "memory": memory,
            "base_loads": self.base_loads,
            "lenses": {
                "device": device_ids,
                "host": self.host.lens_ids(),
                "failed": {k: f.error.message for k, f in self.failed.items()},
            },
            "lens_bytes": {r.lens_id: r.nbytes for r in self.device_lenses()},
            "donors": [str(p) for p in self.donors.paths()],
            "donor_loads": self.donors.loads,
            "in_flight": self.in_flight,
            "busy_threads": self.busy_threads,
            "switches": dict(self.switches),
            "loads": dict(self.loads),
            "load_history": {k: s.summary() for k, s in self.history.items()}
            | {
                "base": {
                    "count": 1,
                    "mean_seconds": self.base_load_seconds,
                    "mean_bytes": self.base_bytes,
                }
            },  # fmt: skip
            "max_lenses_per_replica": self.replica.max_lenses_per_replica,
            "host_cache_bytes": self.replica.host_cache_bytes,
            "updated_at": time.time(),
        }

    def memory(self, *, extra_lens_bytes: int = 0) -> dict[str, int]:
        """Accounted tensor bytes (base, lenses on the device, donors) and device readings."""
        lens_bytes = sum(r.nbytes for r in self.device_lenses()) + extra_lens_bytes
        return {
            "base_bytes": self.base_bytes,
            "lens_bytes": lens_bytes,
            "donor_bytes": self.donors.nbytes,
            "host_bytes": self.host.nbytes,
            **read_memory(self.device),
        }

    def __del__(self) -> None:
        # Serve calls this on a graceful replica shutdown; drop out of the group status.
        registry = getattr(self, "_registry", None)
        if registry is not None:
            registry.forget.remote(self.group.group_id, self.replica_id)
            self._registry = None

    # -- reporting -------------------------------------------------------------------------

    def _ids(self) -> dict[str, str]:
        return {"group_id": self.group.group_id, "replica_id": self.replica_id}

    def _publish(self) -> None:
        if not self._in_serve:
            return
        if self._registry is None:
            self._registry = get_registry()
        self._registry.push.remote(self.snapshot())

    def _log_event(self, event: str, lens_id: str | None, **fields: Any) -> None:
        record = {"event": event, **self._ids(), "lens_id": lens_id, **fields}
        log.info("%s", json.dumps(record, default=str))


async def _drain(events: asyncio.Queue, task: asyncio.Future) -> AsyncIterator[dict[str, Any]]:
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


def _name_lens(exc: LensError, lens_id: str) -> None:
    """Make a load failure name its lens: lenscore's corrupt/missing errors name only a path."""
    if lens_id not in exc.message:
        exc.message = f"lens {lens_id}: {exc.message}"
        exc.args = (exc.message,)
    exc.detail = {**exc.detail, "lens_id": lens_id}


def _consume(future: asyncio.Future) -> None:
    # Retrieve the exception of a thread whose request was cancelled, so asyncio does not
    # log "exception was never retrieved" for work nobody waits on any more.
    if not future.cancelled():
        future.exception()


def _pick_device() -> str:
    import ray

    if torch.cuda.is_available() and ray.is_initialized() and ray.get_gpu_ids():
        return "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned
    return "cpu"


def _replica_identity() -> tuple[str, str | None]:
    """(replica_id, Ray actor name) inside Serve; ("local-<pid>", None) in-process."""
    try:
        context = serve.get_replica_context()
    except RayServeException:
        import os

        return f"local-{os.getpid()}", None
    import ray

    return context.replica_id.unique_id, ray.get_runtime_context().get_actor_name()
