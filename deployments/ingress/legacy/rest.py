"""The old backend's REST routes: `POST /analyze` + `GET /status/{id}`, health, GPU stats, reset.

Each maps onto v2 (README §Migrating from the old backend): an analysis is a durable
`analyze` job (`ingress/jobs.py`) whose status and result read back in the old shape
(`mapping.py`). Same API key, rate limit and body limit as v2.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from deployments.ingress.auth import require_api_key
from deployments.ingress.calls import admit
from deployments.ingress.jobs import JobRunner, job_owner
from deployments.ingress.legacy import catalog, mapping
from deployments.ingress.legacy.schemas import LegacyAnalyzeRequest, Queued
from deployments.ingress.schemas import AUTH_ERRORS, ErrorBody
from deployments.ingress.state import IngressState
from lenscore import BadInput

router = APIRouter(
    tags=["legacy"],
    dependencies=[Depends(require_api_key)],
    responses=AUTH_ERRORS,
)

SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (404, 413, 422, 503)
}


async def submit_analysis(
    request: Request,
    lens_id: str,
    text: str,
    options: Any,
    legacy: dict[str, Any],
) -> dict[str, Any]:
    """Start an old-style analysis as a v2 job; return the job's view."""
    state: IngressState = request.app.state.ingress
    runner: JobRunner = request.app.state.jobs
    v2_options, ignored = mapping.analysis_options(options)
    inputs = mapping.chat_input(text, options)
    spec, body = mapping.analysis_spec(
        lens_id, inputs, v2_options, {**legacy, "ignored_options": ignored}
    )
    admit(state, lens_id, body, "legacy analyze")
    return await runner.submit(spec, job_owner(request, request.app.state.guard))


@router.post(
    "/analyze",
    response_model=Queued,
    response_model_exclude_none=True,
    responses=SUBMIT_ERRORS,
    summary="Queue an analysis (old API; poll GET /status/{request_id})",
)
async def legacy_analyze(body: LegacyAnalyzeRequest, request: Request) -> Queued:
    """Queue the text's analysis with the old options; `request_id` is a v2 job id."""
    state: IngressState = request.app.state.ingress
    text = body.text.strip()
    if not text:
        raise BadInput("text cannot be empty or just whitespace")
    lens_id = body.model_id or body.options.model_id or mapping.default_lens_id(state)
    view = await submit_analysis(request, lens_id, text, body.options, {"route": "rest"})
    stats = await request.app.state.jobs.queue_stats()
    return Queued(
        request_id=view["job_id"],
        status="queued",
        queue_position=view["queue_position"],
        queue_size=stats["queue_size"],
    )


@router.get(
    "/status/{request_id}",
    responses={404: {"model": ErrorBody}, 410: {"model": ErrorBody}},
    summary="Status and result of a request (old API)",
)
async def legacy_status(request_id: str, request: Request) -> dict[str, Any]:
    """`queued` -> `processing` -> `completed` (with `result.data` and `result.metadata`)."""
    runner: JobRunner = request.app.state.jobs
    view = await runner.get(request_id, job_owner(request, request.app.state.guard))
    return mapping.status_body(request.app.state.ingress, view)


@router.get("/health", summary="Health as the old backend reported it")
async def legacy_health(request: Request) -> dict[str, Any]:
    """`healthy` while a replica runs, `degraded` without a GPU or with nothing running."""
    state: IngressState = request.app.state.ingress
    snapshots = await state.snapshots()
    replicas = [r for group in snapshots.values() for r in group]
    gpus = [r.device for r in replicas if r.device.startswith("cuda")]
    stats = await request.app.state.jobs.queue_stats()
    health: dict[str, Any] = {
        "status": "healthy",
        "model_loaded": any(r.lenses.device for r in replicas),
        "gpu_available": bool(gpus),
        "gpu_name": gpus[0] if gpus else None,
        "queue_size": stats["queue_size"],
        "replicas_running": len(replicas),
    }
    if not gpus:
        health["status"] = "degraded"
        health["warning"] = "No GPU available" if replicas else "No replica running"
    return health


@router.get("/api/gpu_stats", summary="Device memory of the replicas (old API)")
async def legacy_gpu_stats(request: Request) -> dict[str, Any]:
    """Per-replica memory in GB; the first replica also at the top level, as before."""
    state: IngressState = request.app.state.ingress
    return catalog.gpu_stats(await state.snapshots())


@router.post("/reset", summary="Cancel the caller's jobs (there is no global model to reset)")
async def legacy_reset(request: Request) -> dict[str, Any]:
    """Cancel every queued or running job of the caller's API key; lenses stay loaded."""
    runner: JobRunner = request.app.state.jobs
    owner = job_owner(request, request.app.state.guard)
    cancelled = []
    for view in await runner.active(owner):
        await runner.cancel(view["job_id"], owner)
        cancelled.append(view["job_id"])
    return {
        "status": "reset",
        "message": (
            f"cancelled {len(cancelled)} queued or running request(s) of this API key. "
            "lens-serve has no global model to clear: lenses stay loaded for other users "
            "(the /ws unload_group message moves a group's lenses off the devices)"
        ),
        "cancelled": cancelled,
    }
