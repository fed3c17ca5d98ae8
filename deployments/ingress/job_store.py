"""Durable jobs, shared by every ingress replica: one named, detached Ray actor per app.

Below `ingress/jobs.py` (which runs each job in the replica that accepted it): the actor
holds the application's `JobTable` (`job_table.py`), so a job is readable, and cancellable,
from any ingress replica (DESIGN §HTTP API, jobs).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from deployments.ingress.job_table import ACTIVE, JobLimits, JobRecord, JobTable

STORE_NAME_PREFIX = "lens-serve-jobs"
STORE_NAMESPACE = "serve"


@ray.remote(num_cpus=0)
class JobStore:
    """The `JobTable` of one application, shared by its ingress replicas (an async actor).

    `wait` lets a reader sleep until a job changes (server-sent events) instead of polling.
    """

    def __init__(self) -> None:
        self.table = JobTable()
        self._changed: dict[str, asyncio.Event] = {}

    def _touch(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    async def create(self, record: JobRecord, limits: JobLimits) -> dict[str, Any]:
        """See `JobTable.create`."""
        return self.table.create(record, limits)

    async def start(self, job_id: str, limits: JobLimits) -> bool:
        """See `JobTable.start`."""
        started = self.table.start(job_id, limits)
        self._touch(job_id)
        return started

    async def progress(self, job_id: str, done: int, total: int) -> None:
        """See `JobTable.progress`."""
        self.table.progress(job_id, done, total)
        self._touch(job_id)

    async def finish(
        self, job_id: str, status: str, limits: JobLimits, fields: dict[str, Any]
    ) -> None:
        """See `JobTable.finish`; `fields` holds `result_json` and `error`."""
        self.table.finish(job_id, status, limits, **fields)
        self._touch(job_id)

    async def renew(self, runner_id: str, job_ids: list[str], limits: JobLimits) -> list[str]:
        """See `JobTable.renew`; also sweeps expired jobs and lost runners."""
        cancelled = self.table.renew(runner_id, job_ids, limits)
        self._sweep(limits)
        return cancelled

    async def get(
        self, job_id: str, owner: str | None, limits: JobLimits, with_result: bool = True
    ) -> dict[str, Any]:
        """Return the caller's job as viewed (see `JobTable.get`)."""
        self._sweep(limits)
        return self.table.view(self.table.get(job_id, owner), with_result=with_result)

    async def wait(
        self, job_id: str, owner: str | None, since: int, timeout_s: float, limits: JobLimits
    ) -> dict[str, Any] | None:
        """Return the job once its version is past `since`; None after `timeout_s`."""
        record = self.table.get(job_id, owner)
        if record.version <= since:
            event = self._changed.setdefault(job_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except asyncio.TimeoutError:
                self._sweep(limits)
                record = self.table.get(job_id, owner)
                return None if record.version <= since else self.table.view(record)
            record = self.table.get(job_id, owner)
        with_result = record.status not in ACTIVE
        return self.table.view(record, with_result=with_result)

    async def request_cancel(
        self, job_id: str, owner: str | None, limits: JobLimits
    ) -> dict[str, Any]:
        """See `JobTable.request_cancel`."""
        record = self.table.request_cancel(job_id, owner, limits)
        self._touch(job_id)
        return self.table.view(record)

    async def active(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Return views of the queued and running jobs (of one owner when given)."""
        return [self.table.view(r) for r in self.table.active(owner)]

    async def queue_stats(self, limits: JobLimits) -> dict[str, Any]:
        """See `JobTable.queue_stats`."""
        self._sweep(limits)
        return self.table.queue_stats()

    def _sweep(self, limits: JobLimits) -> None:
        before = {r.job_id: r.version for r in self.table.jobs.values()}
        self.table.sweep(limits)
        for job_id, version in before.items():
            record = self.table.jobs.get(job_id)
            if record is None or record.version != version:
                self._touch(job_id)


def get_job_store(app_name: str) -> ray.actor.ActorHandle:
    """Return the application's job store, creating it if no ingress replica has yet.

    Detached and named per application, like the status registry: it outlives any one
    ingress replica, so a job stays readable from every replica (KubeRay runs two).
    """
    name = f"{STORE_NAME_PREFIX}-{app_name}" if app_name else STORE_NAME_PREFIX
    return JobStore.options(
        name=name,
        namespace=STORE_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_concurrency=1000,
    ).remote()
