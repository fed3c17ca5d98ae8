"""The job table: status, progress, result and error of each job of one application.

Held by the `JobStore` actor (`job_store.py`) below `ingress/jobs.py`. Bounded by count and
bytes; a result is dropped a TTL after its job ends (a tombstone answers 410 for a while
after); a job whose runner stopped renewing its lease fails (DESIGN §HTTP API, jobs). Plain
Python with an injectable clock.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from deployments.ingress.errors import ApiError, Overloaded

ACTIVE = ("queued", "running")
# Tombstones kept per stored job: a dropped id answers 410 rather than 404 for a while.
TOMBSTONES_PER_JOB = 4


class UnknownJob(ApiError):
    """No job with this id, or it belongs to another API key (not told apart)."""

    code = "unknown_job"

    def __init__(self, job_id: str) -> None:
        shown = job_id if len(job_id) <= 100 else job_id[:100] + "..."
        super().__init__(
            f"unknown job_id {shown!r} (or it was created with another API key)",
            {"job_id": shown},
        )


class JobGone(ApiError):
    """The job's result was dropped: its TTL passed, or room was needed for newer jobs."""

    code = "job_expired"

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(
            f"job {job_id} is gone ({reason}); results are kept for the configured "
            "jobs_ttl_s after a job ends",
            {"job_id": job_id, "reason": reason},
        )


@dataclasses.dataclass(frozen=True)
class JobLimits:
    """Bounds of the table (AppArgs `jobs_*`): count, bytes, result TTL, runner lease."""

    max_jobs: int
    max_bytes: int
    ttl_seconds: float
    lease_seconds: float = 30.0


@dataclasses.dataclass
class JobRecord:
    """One job as stored; `result_json` is the lens route's response body, encoded."""

    job_id: str
    kind: str
    lens_id: str
    group_id: str
    owner: str | None
    runner_id: str
    request: dict[str, Any]
    request_bytes: int
    created_at: float
    lease_until: float
    status: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    progress: dict[str, int] | None = None
    result_json: str | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    version: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes this job holds: its request and its encoded result."""
        return self.request_bytes + len(self.result_json or "")


class JobTable:
    """Jobs of one application, oldest first; every method takes the caller's owner."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self.gone: OrderedDict[str, tuple[str | None, str]] = OrderedDict()  # id -> owner, why
        self.nbytes = 0

    # -- writes (the runner) ----------------------------------------------------------------

    def create(self, record: JobRecord, limits: JobLimits) -> dict[str, Any]:
        """Store a new queued job; drop finished jobs to make room.

        Raises:
            Overloaded: `max_jobs` jobs are queued or running, or the request alone is over
                `max_bytes`.

        """
        self.sweep(limits)
        if record.request_bytes > limits.max_bytes:
            raise Overloaded(
                f"the job's request ({record.request_bytes} bytes) is over jobs_max_bytes",
                {"max_bytes": limits.max_bytes},
            )
        self._make_room(limits, count=1, nbytes=record.request_bytes)
        if len(self.jobs) >= limits.max_jobs:
            raise Overloaded(
                f"{len(self.jobs)} jobs are queued or running (jobs_max_count); retry later",
                {"max_jobs": limits.max_jobs},
                retry_after_s=5.0,
            )
        self.jobs[record.job_id] = record
        self.nbytes += record.nbytes
        return self.view(record)

    def start(self, job_id: str, limits: JobLimits) -> bool:
        """Mark a queued job running; False when it was cancelled (or dropped) meanwhile."""
        record = self.jobs.get(job_id)
        if record is None or record.status != "queued":
            return False
        now = self.clock()
        record.status, record.started_at = "running", now
        record.lease_until = now + limits.lease_seconds
        record.version += 1
        return True

    def progress(self, job_id: str, done: int, total: int) -> None:
        """Record positions analysed so far."""
        record = self.jobs.get(job_id)
        if record is not None and record.status == "running":
            record.progress = {"done": done, "total": total}
            record.version += 1

    def finish(
        self,
        job_id: str,
        status: str,
        limits: JobLimits,
        *,
        result_json: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """End a job (once): keep its result for the TTL, within `max_bytes`."""
        record = self.jobs.get(job_id)
        if record is None or record.status not in ACTIVE:
            return
        size = len(result_json or "")
        if result_json is not None and record.request_bytes + size > limits.max_bytes:
            status, result_json = "failed", None
            error = {
                "code": "result_too_large",
                "message": f"the result ({size} bytes) is over jobs_max_bytes "
                f"({limits.max_bytes}); ask for fewer positions or use the lens route",
                "detail": {"result_bytes": size, "max_bytes": limits.max_bytes},
            }
        if result_json is not None:
            self._make_room(limits, count=0, nbytes=size, keep=job_id)
        now = self.clock()
        record.status, record.finished_at = status, now
        record.expires_at = now + limits.ttl_seconds
        record.result_json, record.error = result_json, error
        record.version += 1
        self.nbytes += size

    def renew(self, runner_id: str, job_ids: list[str], limits: JobLimits) -> list[str]:
        """Extend the leases of a runner's jobs; return those whose cancel was requested."""
        until = self.clock() + limits.lease_seconds
        cancelled = []
        for job_id in job_ids:
            record = self.jobs.get(job_id)
            if record is None or record.runner_id != runner_id:
                continue
            record.lease_until = until
            if record.cancel_requested or record.status not in ACTIVE:
                cancelled.append(job_id)
        return cancelled

    # -- reads and requests (any ingress replica) -------------------------------------------

    def get(self, job_id: str, owner: str | None) -> JobRecord:
        """Return the caller's job.

        Raises:
            UnknownJob: no such job, or another owner's.
            JobGone: it expired or was dropped for room.

        """
        record = self.jobs.get(job_id)
        if record is not None and _may_see(record.owner, owner):
            return record
        gone = self.gone.get(job_id)
        if record is None and gone is not None and _may_see(gone[0], owner):
            raise JobGone(job_id, gone[1])
        raise UnknownJob(job_id)

    def request_cancel(self, job_id: str, owner: str | None, limits: JobLimits) -> JobRecord:
        """Cancel a queued job now; ask a running one's runner to stop it."""
        record = self.get(job_id, owner)
        if record.status == "queued":
            now = self.clock()
            record.status, record.finished_at = "cancelled", now
            record.expires_at = now + limits.ttl_seconds
            record.error = {"code": "cancelled", "message": "cancelled before it started",
                            "detail": {}}  # fmt: skip
        if record.status in ACTIVE:
            record.cancel_requested = True
        record.version += 1
        return record

    def active(self, owner: str | None = None, runner_id: str | None = None) -> list[JobRecord]:
        """Queued and running jobs (of one owner or runner when given), oldest first."""
        return [
            r
            for r in self.jobs.values()
            if r.status in ACTIVE
            and (owner is None or r.owner == owner)
            and (runner_id is None or r.runner_id == runner_id)
        ]

    def queue_stats(self) -> dict[str, Any]:
        """Count queued and running jobs, with the queued ids in order (legacy `queue_update`)."""
        queued = [r.job_id for r in self.jobs.values() if r.status == "queued"]
        running = sum(1 for r in self.jobs.values() if r.status == "running")
        return {
            "queue_size": len(queued),
            "queued_requests": len(queued),
            "processing_requests": running,
            "total_active": len(queued) + running,
            "queued_ids": queued,
        }

    def view(self, record: JobRecord, *, with_result: bool = False) -> dict[str, Any]:
        """Show the job as the API does (`JobView`), its result still encoded."""
        out = {
            "job_id": record.job_id,
            "kind": record.kind,
            "lens_id": record.lens_id,
            "group_id": record.group_id,
            "status": record.status,
            "queue_position": self._position(record),
            "progress": record.progress,
            "created_at": record.created_at,
            "started_at": record.started_at,
            "finished_at": record.finished_at,
            "expires_at": record.expires_at,
            "timings": _timings(record, self.clock()),
            "cancel_requested": record.cancel_requested,
            "error": record.error,
            "runner_id": record.runner_id,
            "version": record.version,
        }
        if with_result:
            out["request"] = record.request
            out["result_json"] = record.result_json
        return out

    def _position(self, record: JobRecord) -> int:
        if record.status != "queued":
            return 0
        queued = [r.job_id for r in self.jobs.values() if r.status == "queued"]
        return queued.index(record.job_id) + 1

    # -- bounds -----------------------------------------------------------------------------

    def sweep(self, limits: JobLimits) -> None:
        """Drop results past their TTL; fail jobs whose runner's lease ran out."""
        now = self.clock()
        for record in list(self.jobs.values()):
            if record.status in ACTIVE and now > record.lease_until:
                record.status, record.finished_at = "failed", now
                record.expires_at = now + limits.ttl_seconds
                record.error = {
                    "code": "replica_unavailable",
                    "message": "the ingress replica running this job stopped (it died or was "
                    "restarted); submit the job again",
                    "detail": {"runner_id": record.runner_id},
                }
                record.version += 1
            elif record.expires_at is not None and now > record.expires_at:
                self._drop(record, "expired", limits)

    def _make_room(
        self, limits: JobLimits, *, count: int, nbytes: int, keep: str | None = None
    ) -> None:
        finished = [r for r in self.jobs.values() if r.status not in ACTIVE and r.job_id != keep]
        for record in finished:  # oldest first
            if (
                len(self.jobs) + count <= limits.max_jobs
                and self.nbytes + nbytes <= limits.max_bytes
            ):
                return
            self._drop(record, "dropped to make room for newer jobs", limits)

    def _drop(self, record: JobRecord, reason: str, limits: JobLimits) -> None:
        del self.jobs[record.job_id]
        self.nbytes -= record.nbytes
        self.gone[record.job_id] = (record.owner, reason)
        while len(self.gone) > TOMBSTONES_PER_JOB * limits.max_jobs:
            self.gone.popitem(last=False)


def _may_see(job_owner: str | None, caller: str | None) -> bool:
    # Auth off: jobs have no owner and every caller sees them.
    return job_owner is None or job_owner == caller


def _timings(record: JobRecord, now: float) -> dict[str, float]:
    timings = {}
    started = record.started_at
    timings["queued_seconds"] = round((started or record.finished_at or now) - record.created_at, 6)
    if started is not None:
        timings["run_seconds"] = round((record.finished_at or now) - started, 6)
    return timings
