"""Running durable jobs: each runs in the ingress replica that accepted it, as an asyncio task.

Between the job routes (`routes/jobs.py`, the legacy adapters) and `IngressState`: a job's
status, progress and result live in the application's `JobStore` actor, so every ingress
replica reads them. The replica running a job renews its lease twice a second and learns
there of cancellations asked on other replicas; if it dies, the lease runs out and the job
fails with `replica_unavailable` (DESIGN §HTTP API, jobs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray.exceptions import RayActorError
from starlette.requests import HTTPConnection

from deployments.ingress.auth import Guard, client_identity, presented_key
from deployments.ingress.errors import body_for, translate
from deployments.ingress.job_store import get_job_store
from deployments.ingress.job_table import JobLimits, JobRecord
from deployments.ingress.state import IngressState, cancel_quietly

logger = logging.getLogger("ray.serve")

# How often a runner renews its jobs' leases and picks up cancellations, in seconds.
KEEPER_PERIOD_SECONDS = 0.5
# Progress is written to the store at most this often per job (the last one always).
PROGRESS_PERIOD_SECONDS = 0.25
# Store calls must not hang a request when the actor is gone.
STORE_TIMEOUT_SECONDS = 10.0

Listener = Callable[[dict[str, Any]], Awaitable[None]]
Prepare = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What to run: the lens method (`kind`), its lens, the replica body, the public request."""

    kind: str
    lens_id: str
    body: dict[str, Any]
    request: dict[str, Any]


def job_owner(connection: HTTPConnection, guard: Guard) -> str | None:
    """Return who may read a job: a digest of the caller's API key; None when auth is off."""
    if not guard.is_enabled:
        return None
    return client_identity(connection, presented_key(connection))


class JobRunner:
    """Submits, runs, cancels and reads jobs for one ingress replica (`app.state.jobs`)."""

    def __init__(self, state: IngressState) -> None:
        self.state = state
        self.runner_id = uuid.uuid4().hex[:16]
        args = state.args
        self.limits = JobLimits(
            max_jobs=args.jobs_max_count, max_bytes=args.jobs_max_bytes, ttl_seconds=args.jobs_ttl_s
        )
        self._max_running = args.jobs_max_running
        self._gate: asyncio.Semaphore | None = None
        self._store: Any = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._closing = False

    # -- the store --------------------------------------------------------------------------

    async def call_store(self, method: str, *args: Any) -> Any:
        """Call the store actor; its errors come back as `LensError`s (404, 410, 503)."""
        if self._store is None:
            self._store = get_job_store(self.state.app_name)
        try:
            return await asyncio.wait_for(
                getattr(self._store, method).remote(*args), STORE_TIMEOUT_SECONDS
            )
        except Exception as exc:
            if isinstance(exc, RayActorError):
                self._store = None  # a restarted store is a new actor
            translated = translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    # -- submit and run ---------------------------------------------------------------------

    async def submit(
        self,
        spec: JobSpec,
        owner: str | None,
        *,
        listener: Listener | None = None,
        prepare: Prepare | None = None,
    ) -> dict[str, Any]:
        """Store a queued job and start running it here; return its view.

        `listener` gets this replica's events of the job as they happen (`started`,
        `progress`, `finished`); `prepare` may rewrite the body just before it runs.
        """
        group = self.state.group_for_lens(spec.lens_id)
        self.state.lens_handle(spec.lens_id)  # an unavailable group fails here, not later
        now = time.time()
        record = JobRecord(
            job_id=uuid.uuid4().hex,
            kind=spec.kind,
            lens_id=spec.lens_id,
            group_id=group.group_id,
            owner=owner,
            runner_id=self.runner_id,
            request=spec.request,
            request_bytes=len(json.dumps(spec.request)),
            created_at=now,
            lease_until=now + self.limits.lease_seconds,
        )
        view = await self.call_store("create", record, self.limits)
        task = asyncio.create_task(
            self._run(record.job_id, spec, group.group_id, listener, prepare)
        )
        self._tasks[record.job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(record.job_id, None))
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep())
        return view

    async def _run(
        self,
        job_id: str,
        spec: JobSpec,
        group_id: str,
        listener: Listener | None,
        prepare: Prepare | None,
    ) -> None:
        if self._gate is None:
            self._gate = asyncio.Semaphore(self._max_running)
        try:
            async with self._gate:
                if not await self.call_store("start", job_id, self.limits):
                    await _tell(listener, {"event": "finished", "status": "cancelled"})
                    return
                await _tell(listener, {"event": "started"})
                body = spec.body if prepare is None else await prepare(spec.body)
                result = await self._execute(job_id, spec, body, listener)
                result.setdefault("meta", {}).setdefault("group_id", group_id)
        except asyncio.CancelledError:
            await self._end(job_id, listener, "failed" if self._closing else "cancelled")
        except Exception as exc:  # every failure of a job is reported in the job
            await self._end(job_id, listener, "failed", error=body_for(exc)["error"])
        else:
            await self._end(job_id, listener, "completed", result=result)

    async def _execute(
        self, job_id: str, spec: JobSpec, body: dict[str, Any], listener: Listener | None
    ) -> dict[str, Any]:
        if spec.kind != "analyze":
            return await self.state.call(spec.lens_id, spec.kind, body)
        first, stream = await self.state.open_stream(spec.lens_id, "analyze_stream", body)
        meta: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        written = 0.0
        try:
            async for item in _chain(first, stream):
                kind = item.get("event")
                if kind == "progress":
                    done, total = item["done"], item["total"]
                    await _tell(listener, {"event": "progress", "done": done, "total": total})
                    if done >= total or time.monotonic() - written >= PROGRESS_PERIOD_SECONDS:
                        written = time.monotonic()
                        await self.call_store("progress", job_id, done, total)
                elif kind == "meta":
                    meta = item["meta"]
                elif kind == "row":
                    rows.append(item["row"])
        finally:
            cancel_quietly(stream)
        return {"meta": meta, "rows": rows}

    async def _end(
        self,
        job_id: str,
        listener: Listener | None,
        status: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        if status == "cancelled":
            error = {"code": "cancelled", "message": "the job was cancelled", "detail": {}}
        elif status == "failed" and error is None:
            error = {
                "code": "replica_unavailable",
                "message": "the ingress replica running this job shut down; submit it again",
                "detail": {"runner_id": self.runner_id},
            }
        encoded = None if result is None else json.dumps(result, separators=(",", ":"))
        try:
            await asyncio.shield(
                self.call_store(
                    "finish", job_id, status, self.limits, {"result_json": encoded, "error": error}
                )
            )
        except Exception:  # the store is gone; the job's lease runs out there instead
            logger.warning("could not record the end of job %s", job_id, exc_info=True)
        await _tell(
            listener, {"event": "finished", "status": status, "result": result, "error": error}
        )

    async def _keep(self) -> None:
        """Renew the leases of this replica's jobs; cancel those cancelled elsewhere."""
        while self._tasks:
            try:
                cancelled = await self.call_store(
                    "renew", self.runner_id, list(self._tasks), self.limits
                )
            except Exception:  # the next round tries again; the lease outlasts a few misses
                logger.warning("job store unreachable while renewing leases", exc_info=True)
                cancelled = []
            for job_id in cancelled:
                task = self._tasks.get(job_id)
                if task is not None:
                    task.cancel()
            await asyncio.sleep(KEEPER_PERIOD_SECONDS)

    # -- requests from any replica ----------------------------------------------------------

    async def cancel(self, job_id: str, owner: str | None) -> dict[str, Any]:
        """Cancel the caller's job: at once when queued or running here, else via the store."""
        view = await self.call_store("request_cancel", job_id, owner, self.limits)
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
        return view

    async def get(self, job_id: str, owner: str | None) -> dict[str, Any]:
        """Return the caller's job with its request and (once completed) its result."""
        return _decoded(await self.call_store("get", job_id, owner, self.limits, True))

    async def wait(
        self, job_id: str, owner: str | None, since: int, timeout_s: float
    ) -> dict[str, Any] | None:
        """Return the job once it changed after version `since`; None after `timeout_s`."""
        view = await self.call_store("wait", job_id, owner, since, timeout_s, self.limits)
        return None if view is None else _decoded(view)

    async def active(self, owner: str | None) -> list[dict[str, Any]]:
        """Return the caller's queued and running jobs (every job when auth is off)."""
        return await self.call_store("active", owner)

    async def queue_stats(self) -> dict[str, Any]:
        """Return queued and running counts and the queued ids (the legacy `queue_update`)."""
        return await self.call_store("queue_stats", self.limits)

    async def task_result(self, job_id: str) -> None:
        """Wait for a job running on this replica to end (no-op for others)."""
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        """Stop this replica's jobs (the replica shuts down): they end as failed."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STORE_TIMEOUT_SECONDS)
        if self._keeper is not None:
            self._keeper.cancel()


async def _tell(listener: Listener | None, event: dict[str, Any]) -> None:
    if listener is None:
        return
    try:
        await listener(event)
    except Exception:  # a listener that fails (its socket closed) does not stop the job
        logger.debug("job listener failed on a %s event", event.get("event"), exc_info=True)


async def _chain(first: Any, rest: Any) -> AsyncIterator[dict[str, Any]]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def _decoded(view: dict[str, Any]) -> dict[str, Any]:
    encoded = view.pop("result_json", None)
    view["result"] = None if encoded is None else json.loads(encoded)
    return view
