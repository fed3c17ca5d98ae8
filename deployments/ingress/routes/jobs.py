"""`/api/v2/jobs`: submit a durable job, read it from any ingress replica, stream it, cancel it.

A job runs in the ingress replica that accepted it (`ingress/jobs.py`); its state lives in
the application's job store, so any replica answers these routes. Only the API key that
created a job may read or cancel it (another key gets the 404 of an unknown id).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.responses import StreamingResponse

from deployments.ingress.auth import require_api_key
from deployments.ingress.calls import admit
from deployments.ingress.errors import body_for
from deployments.ingress.job_schemas import JobRequest, JobView
from deployments.ingress.job_table import ACTIVE
from deployments.ingress.jobs import JobRunner, JobSpec, job_owner
from deployments.ingress.schemas import AUTH_ERRORS, ErrorBody

router = APIRouter(
    prefix="/api/v2/jobs",
    tags=["jobs"],
    dependencies=[Depends(require_api_key)],
    responses=AUTH_ERRORS,
)

SSE_MEDIA_TYPE = "text/event-stream"
# Which ingress replica answered (tests read a job from a replica other than its runner's).
REPLICA_HEADER = "X-Lens-Serve-Ingress"
# An idle event stream sends a comment this often, so proxies keep it open.
KEEPALIVE_SECONDS = 15.0

JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Unknown job id, or another key's job."},
    410: {"model": ErrorBody, "description": "The job's result expired (jobs_ttl_s)."},
}


def public_view(view: dict[str, Any]) -> dict[str, Any]:
    """Return the view without the store's bookkeeping (`version`)."""
    return {k: v for k, v in view.items() if k != "version"}


@router.post(
    "",
    status_code=202,
    response_model=JobView,
    responses={
        404: {"model": ErrorBody},
        413: {"model": ErrorBody},
        422: {"model": ErrorBody},
        503: {"model": ErrorBody, "description": "Too many jobs queued or running."},
    },
    summary="Submit an analyze, generate or send_message job",
)
async def submit_job(
    body: Annotated[JobRequest, Body()], request: Request, response: Response
) -> dict[str, Any]:
    """Queue the job and start it; poll `GET /api/v2/jobs/{job_id}` or stream its events."""
    state = request.app.state.ingress
    runner: JobRunner = request.app.state.jobs
    admit(state, body.lens_id, body, f"job {body.kind}")
    spec = JobSpec(
        kind=body.kind,
        lens_id=body.lens_id,
        body=body.replica_body(),
        request=body.model_dump(exclude_unset=True),
    )
    view = await runner.submit(spec, job_owner(request, request.app.state.guard))
    response.headers[REPLICA_HEADER] = runner.runner_id
    return public_view(view)


@router.get(
    "/{job_id}",
    response_model=JobView,
    responses=JOB_ERRORS,
    summary="A job's status, progress, timings and (once completed) result",
)
async def get_job(job_id: str, request: Request, response: Response) -> dict[str, Any]:
    """Read the job from the store (any ingress replica answers)."""
    runner: JobRunner = request.app.state.jobs
    view = await runner.get(job_id, job_owner(request, request.app.state.guard))
    response.headers[REPLICA_HEADER] = runner.runner_id
    return public_view(view)


@router.delete(
    "/{job_id}",
    response_model=JobView,
    responses=JOB_ERRORS,
    summary="Cancel a job",
)
async def cancel_job(job_id: str, request: Request, response: Response) -> dict[str, Any]:
    """Cancel a queued job at once, a running one at its next check (within a second).

    A finished job is left as it is.
    """
    runner: JobRunner = request.app.state.jobs
    view = await runner.cancel(job_id, job_owner(request, request.app.state.guard))
    response.headers[REPLICA_HEADER] = runner.runner_id
    return public_view(view)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _events(runner: JobRunner, job_id: str, owner: str | None) -> AsyncIterator[bytes]:
    version, status, progress = -1, None, None
    while True:
        try:
            view = await runner.wait(job_id, owner, version, KEEPALIVE_SECONDS)
        except Exception as exc:  # expired or the store is gone: say so in-band
            yield _sse("error", body_for(exc))
            return
        if view is None:
            yield b": keep-alive\n\n"
            continue
        version = view["version"]
        finished = view["status"] not in ACTIVE
        if view["progress"] and view["progress"] != progress:
            progress = view["progress"]
            yield _sse("progress", progress)
        if view["status"] != status and not finished:
            status = view["status"]
            yield _sse("status", public_view({**view, "result": None}))
        if finished:
            yield _sse("done", public_view(view))
            return


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {SSE_MEDIA_TYPE: {}},
            "description": "Server-sent events: status, progress*, then done (the job).",
        },
        **JOB_ERRORS,
    },
    summary="Stream a job's progress as server-sent events",
)
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    """`status` and `progress` events while the job runs, then `done` with the whole job."""
    runner: JobRunner = request.app.state.jobs
    owner = job_owner(request, request.app.state.guard)
    await runner.get(job_id, owner)  # unknown or expired: a plain 404 / 410
    return StreamingResponse(
        _events(runner, job_id, owner),
        media_type=SSE_MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", REPLICA_HEADER: runner.runner_id},
    )
