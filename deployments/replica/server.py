"""GroupServer: one Serve replica of a model group, the base loaded once, lenses multiplexed.

Below the ingress on the data path: a request arrives through the group's handle with its
lens id as Serve's multiplexed model id; `LensResidency` brings the lens onto the device,
`Execution` runs lenscore off the event loop, and the replica publishes a `ReplicaStatus`
to the registry after every change (DESIGN §Serving shape). A little over 400 lines: one
method per request kind Serve calls, each a thin shell around residency, execution and the
scheduler; the parts themselves live in those modules.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import ray
import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.config import GroupSpec, ReplicaConfig
from deployments.group_files import file_stamp, reread_group
from deployments.ops.metrics import ReplicaMetrics
from deployments.redact import redact_text
from deployments.replica.activations import ActivationCache
from deployments.replica.execution import Execution, drain
from deployments.replica.memory import read_memory
from deployments.replica.registry import StatusPublisher
from deployments.replica.residency import LensResidency
from deployments.replica.scheduler import BatchScheduler, settings_of
from deployments.replica.status import LoadStats, ReplicaLenses, ReplicaMemory, ReplicaStatus
from deployments.replica.tiers import ResidentLens
from lenscore import AnalysisOptions, BadInput, analyze, generate, load_base, reply

log = logging.getLogger("ray.serve")


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
        run_analysis: Callable[..., dict[str, Any]] | None = None,
        run_generation: Callable[..., dict[str, Any]] = generate,
    ) -> None:
        """Load the base onto this replica's device; lenses load on their first request.

        Args:
            group: the validated group.
            device: force a device (default: the GPU Ray assigned, else CPU).
            run_analysis: a stand-in for `lenscore.analyze` (a test seam for injecting a
                device OOM); given one, analyses run unbatched through it.
            run_generation: `lenscore.generate`; the same seam for generation.

        """
        self.group = group
        self._lens_ids = {lens.lens_id for lens in group.lenses}
        self._file_stamp = file_stamp(group.source_file)
        self._analyze = run_analysis or analyze
        self._seam = run_analysis is not None
        self._generate = run_generation
        identity = _replica_identity()
        self.replica_id, self.app_name, self._actor_name = identity
        self.device = torch.device(device or _pick_device())
        self.metrics = ReplicaMetrics(group.group_id)
        started = time.perf_counter()
        base = load_base(group.base_model, dtype=group.dtype, device=self.device)
        self.base_load_seconds = time.perf_counter() - started
        self.metrics.base_load_seconds.observe(self.base_load_seconds)
        in_serve = self._actor_name is not None
        self.publisher = StatusPublisher(self.snapshot, enabled=in_serve)
        self.residency = LensResidency(
            group, base, self.device, self.metrics,
            in_serve=in_serve, on_change=self.publisher.changed, log_event=self._log_event,
        )  # fmt: skip
        self.execution = Execution(self.residency, on_change=self.publisher.changed)
        self.activations = ActivationCache(group.replica.activation_cache_bytes)
        self.scheduler = BatchScheduler(
            settings_of(group.replica), read_activations=self.activations.read,
            expected=lambda: self.execution.in_flight, on_change=self.publisher.changed,
        )  # fmt: skip
        # Report at once: until a replica reports, the ingress sees its group as having none
        # and would count the next request as a cold start.
        self.publisher.publish_now()
        memory = self.memory().model_dump()
        self._log_event("base_loaded", None, seconds=self.base_load_seconds, memory=memory)

    @property
    def base(self) -> Any:
        """The shared base model (`lenscore.Base`)."""
        return self.residency.base

    # -- request methods -------------------------------------------------------------------

    async def analyze(self, body: dict[str, Any], *, lens_id: str | None = None) -> dict:
        """Analyse `text` or `messages` with the request's lens (DESIGN §Response shapes)."""
        stop = threading.Event()
        async with self.execution.using(await self._lens_id(lens_id)) as (resident, switch):
            options = self._options(body, resident.lens_id)
            started = time.perf_counter()
            result = await self._run_analysis(resident, body, options, stop)
        self.metrics.record_analysis(time.perf_counter() - started, len(result["rows"]))
        result["meta"].update(self._public_meta(resident), switch=switch.as_dict())
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
            async with self.execution.using(await self._lens_id(lens_id)) as (resident, switch):
                options = self._options(body, resident.lens_id)
                started = time.perf_counter()
                work = self._run_analysis(resident, body, options, stop, on_progress, retry=False)
                task = asyncio.ensure_future(work)
                async for event in drain(events, task):
                    yield event
                result = task.result()
                finished_at = time.time()  # the lens's last use by this request
        finally:
            stop.set()
        self.metrics.record_analysis(time.perf_counter() - started, len(result["rows"]))
        meta = {**result["meta"], **self._public_meta(resident),
                "switch": switch.as_dict(), "finished_at": finished_at}  # fmt: skip
        yield {"event": "meta", "meta": meta}
        for row in result["rows"]:
            yield {"event": "row", "row": row}
        yield {"event": "done"}

    async def generate(self, body: dict[str, Any], *, lens_id: str | None = None) -> dict:
        """Continue `text`/`messages` with the lens's activation model (donor or base)."""
        stop = threading.Event()
        async with self.execution.using(await self._lens_id(lens_id)) as (resident, switch):

            def work() -> dict:
                return self._generate(
                    resident.lens,
                    text=body.get("text"),
                    messages=body.get("messages"),
                    max_new_tokens=body.get("max_new_tokens", 32),
                    temperature=body.get("temperature", 1.0),
                    seed=body.get("seed"),
                    num_continuations=body.get("num_continuations", 1),
                    should_stop=stop.is_set,
                )

            result = await self.execution.run_with_oom_retry(
                resident, work, work, stop, advice="retry later or with fewer continuations"
            )
        result["meta"].update(self._public_meta(resident), switch=switch.as_dict())
        return result

    async def send_message(self, body: dict[str, Any], *, lens_id: str | None = None) -> dict:
        """One assistant reply to `messages` from the activation model, until end of turn."""
        stop = threading.Event()
        async with self.execution.using(await self._lens_id(lens_id)) as (resident, switch):

            def work() -> dict:
                return reply(
                    resident.lens,
                    body.get("messages"),
                    max_new_tokens=body.get("max_new_tokens", 1024),
                    temperature=body.get("temperature", 1.0),
                    seed=body.get("seed"),
                    prefill=body.get("prefill"),
                    should_stop=stop.is_set,
                )

            result = await self.execution.run_with_oom_retry(
                resident, work, work, stop, advice="retry later or with a shorter chat"
            )
        lens = self.group.lens(resident.lens_id)
        result["meta"].update(self._ids(), base_model=self.group.base_model.name,
                              donor=lens.donor, switch=switch.as_dict())  # fmt: skip
        return result

    async def unload_lenses(self, *, lens_id: str | None = None) -> dict[str, Any]:
        """Move every lens no request uses off this replica's device, to the host tier.

        The legacy `/ws` `unload_group`; `lens_id` (or the multiplexed id) only routes the
        call to a replica that holds that lens.
        """
        before = [r.lens_id for r in self.residency.slots.resident()]
        await self.residency.free_device_memory()
        after = [r.lens_id for r in self.residency.slots.resident()]
        self.publisher.changed()
        return {"replica_id": self.replica_id,
                "evicted": [x for x in before if x not in after], "kept": after}  # fmt: skip

    async def ensure_lens(self, *, lens_id: str | None = None) -> dict[str, Any]:
        """Bring the lens onto the device (preload); a failed lens is retried now."""
        lens_id = await self._lens_id(lens_id)
        self.residency.retry_now(lens_id)
        async with self.execution.using(lens_id) as (resident, switch):
            nbytes = resident.nbytes
        return {"lens_id": lens_id, "replica_id": self.replica_id, "bytes": nbytes,
                **switch.as_dict()}  # fmt: skip

    async def _lens_id(self, lens_id: str | None) -> str:
        """Return the request's lens id, after applying a changed group file (one stat)."""
        lens_id = self._request_lens_id(lens_id)
        await self.follow_group_file()
        return lens_id

    async def follow_group_file(self) -> bool:
        """Apply a changed group file's lenses (live add, remove, re-point); True if applied.

        Removed and re-pointed lenses leave the device once idle and are dropped from the
        host tier; nothing else moves. A change that needs a redeploy is logged and ignored.
        """
        stamp = file_stamp(self.group.source_file)
        if stamp is None or stamp == self._file_stamp:
            return False
        self._file_stamp = stamp
        new, why = await asyncio.to_thread(reread_group, self.group)
        if new is None:
            log.warning("group file changed but is not applied: %s", why)
            return False
        self.group = new
        self._lens_ids = {lens.lens_id for lens in new.lenses}
        stale = await self.residency.apply_group(new)
        self._log_event("group_reload", None, lenses=sorted(self._lens_ids), stale=stale)
        self.publisher.changed()
        return True

    def _request_lens_id(self, lens_id: str | None) -> str:
        lens_id = lens_id or serve.get_multiplexed_model_id()
        if not lens_id:
            raise BadInput("no lens id: call with handle.options(multiplexed_model_id=...)")
        return lens_id

    def _options(self, body: dict[str, Any], lens_id: str) -> AnalysisOptions:
        options = AnalysisOptions.from_dict(body.get("options"))
        if options.batch_size is None:
            batch_size = self.group.lens(lens_id).batch_size
            options = dataclasses.replace(options, batch_size=batch_size)
        return options

    async def _run_analysis(
        self,
        resident: ResidentLens,
        body: dict[str, Any],
        options: AnalysisOptions,
        stop: threading.Event,
        on_progress: Callable[[int, int], None] | None = None,
        *,
        retry: bool = True,
    ) -> dict[str, Any]:
        """Run one analysis in the scheduler's shared passes, or alone in a thread.

        Alone when batching is off (`batch_max_rows: 0`) or a test seam stands in for
        lenscore. `retry`: a device OOM frees idle lenses and retries with half the batch.
        """
        try:
            if self._seam or not self.scheduler.settings.enabled:
                hooks = {"read_activations": self.activations.read, "on_progress": on_progress}
                work = self._analysis(resident, body, options, stop, **hooks)
                if not retry:
                    return await self.execution.run(resident, work, stop)
                smaller = self._analysis(resident, body, _halved(options), stop, **hooks)
                return await self.execution.run_with_oom_retry(
                    resident, work, smaller, stop, advice="retry later or with a shorter text"
                )
            free = partial(self.residency.free_device_memory, keep=resident.lens_id)
            return await self.scheduler.analyze(
                resident.lens, text=body.get("text"), messages=body.get("messages"),
                options=options, stop=stop, on_progress=on_progress, hold=resident.hold,
                release=resident.release, free_memory=free if retry else None,
            )  # fmt: skip
        finally:
            self.metrics.record_activation_lookups(*self.activations.take_counts())

    def _analysis(
        self,
        resident: ResidentLens,
        body: dict[str, Any],
        options: AnalysisOptions,
        stop: threading.Event,
        **hooks: Any,
    ) -> Callable[[], dict[str, Any]]:
        def work() -> dict[str, Any]:
            return self._analyze(resident.lens, text=body.get("text"),
                                 messages=body.get("messages"), options=options,
                                 should_stop=stop.is_set, **hooks)  # fmt: skip

        return work

    # -- control ---------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply cache sizes (ReplicaConfig) live: evict or grow without a restart."""
        config = ReplicaConfig.model_validate(user_config or {})
        replica = config.apply_to(self.group.replica)
        await self.residency.reconfigure(replica)
        self.scheduler.reconfigure(settings_of(replica))
        self.activations.resize(replica.activation_cache_bytes)
        self._log_event("reconfigure", None, replica=replica.model_dump(mode="json"))
        self.publisher.changed()

    async def check_health(self) -> None:
        """Answer Serve's health check; follow the group file and re-push the status."""
        await self.follow_group_file()
        self.publisher.publish_now(reconnect=True)

    async def status(self) -> ReplicaStatus:
        """Return this replica's entry of the group status (DESIGN §Response shapes)."""
        return self.snapshot()

    def snapshot(self) -> ReplicaStatus:
        """Build this replica's status on the event loop, without waiting."""
        residency = self.residency
        device_ids = [r.lens_id for r in residency.slots.resident()]
        memory = self.memory()
        self.metrics.record_memory(memory.model_dump())
        self.metrics.record_residency(len(device_ids), len(residency.host.lens_ids()))
        failures = residency.failures()
        base_stats = LoadStats(count=1, mean_seconds=self.base_load_seconds,
                               mean_bytes=residency.base_bytes)  # fmt: skip
        return ReplicaStatus(
            group_id=self.group.group_id,
            replica_id=self.replica_id,
            app_name=self.app_name,
            actor_name=self._actor_name,
            device=str(self.device),
            memory=memory,
            lenses=ReplicaLenses(
                device=device_ids,
                host=residency.host.lens_ids(),
                failed={lens_id: f.message for lens_id, f in failures.items()},
            ),
            failures=failures,
            lens_bytes={r.lens_id: r.nbytes for r in residency.slots.resident()},
            donors=[residency.donor_id(path) for path in residency.donors.paths()],
            donor_loads=residency.donors.loads,
            in_flight=self.execution.in_flight,
            busy_threads=self.execution.busy_threads + self.scheduler.busy,
            switches=dict(residency.switches),
            prefetch=residency.prefetch.report(),
            loads=dict(residency.loads),
            load_history=residency.load_history() | {"base": base_stats},
            max_lenses_per_replica=residency.replica.max_lenses_per_replica,
            host_cache_bytes=residency.replica.host_cache_bytes,
            batching=self.scheduler.stats(),
            activation_cache=self.activations.stats(),
            updated_at=time.time(),
        )

    def memory(self) -> ReplicaMemory:
        """Accounted tensor bytes (base, lenses on the device, donors) and device readings."""
        return ReplicaMemory(**self.residency.memory_bytes(), **read_memory(self.device))

    def __del__(self) -> None:
        # Serve calls this on a graceful replica shutdown; drop out of the group status.
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            publisher.forget(self.app_name, self.group.group_id, self.replica_id)

    # -- reporting -------------------------------------------------------------------------

    def _ids(self) -> dict[str, str]:
        return {"group_id": self.group.group_id, "replica_id": self.replica_id}

    def _public_meta(self, resident: ResidentLens) -> dict[str, Any]:
        # lenscore names the base, donor and checkpoint by path; clients see the base's
        # directory name, the donor's id from the group file and `run/checkpoint_...pt`.
        checkpoint = redact_text(str(resident.lens.checkpoint_path), self.residency.paths)
        return {**self._ids(), "base_model": self.group.base_model.name,
                "donor": self.group.lens(resident.lens_id).donor,
                "checkpoint": checkpoint}  # fmt: skip

    def _log_event(self, event: str, lens_id: str | None, **fields: Any) -> None:
        record = {"event": event, **self._ids(), "lens_id": lens_id, **fields}
        log.info("%s", json.dumps(record, default=str))


def _halved(options: AnalysisOptions) -> AnalysisOptions:
    return dataclasses.replace(options, batch_size=max(1, (options.batch_size or 2) // 2))


def _pick_device() -> str:
    if torch.cuda.is_available() and ray.is_initialized() and ray.get_gpu_ids():
        return "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned
    return "cpu"


def _replica_identity() -> tuple[str, str, str | None]:
    """(replica_id, app name, Ray actor name) in Serve; ("local-<pid>", "", None) in-process."""
    try:
        context = serve.get_replica_context()
    except RayServeException:
        return f"local-{os.getpid()}", "", None
    actor_name = ray.get_runtime_context().get_actor_name()
    return context.replica_id.unique_id, context.app_name, actor_name
