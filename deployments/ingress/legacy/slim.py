"""The old slim API under `/api/slim`: models, layers, analyze, generate, send_message, status.

Old field names, bounds and defaults (the group's first lens when `model_id` is absent, seed
42, best-of-k 8, temperature 1.0, KL off, structured explanations on); each submission is a
v2 job (`ingress/jobs.py`), polled with `GET /api/slim/status/{request_id}`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from deployments.ingress.auth import require_api_key
from deployments.ingress.calls import admit
from deployments.ingress.errors import UnknownLens
from deployments.ingress.job_schemas import SendMessageRequest
from deployments.ingress.jobs import JobRunner, JobSpec, job_owner
from deployments.ingress.legacy import catalog, mapping
from deployments.ingress.legacy.schemas import (
    DEFAULT_SEED,
    Queued,
    SlimAnalyzeRequest,
    SlimGenerateRequest,
    SlimSendMessageRequest,
)
from deployments.ingress.schemas import AUTH_ERRORS, ErrorBody
from deployments.ingress.state import IngressState

router = APIRouter(
    prefix="/api/slim",
    tags=["slim"],
    dependencies=[Depends(require_api_key)],
    responses=AUTH_ERRORS,
)

SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (404, 413, 422, 503)
}
WHAT = {"analyze": "Analysis", "generate": "Generation", "send_message": "Message"}


def _lens_for(state: IngressState, body: Any) -> str:
    # The old slim API took `model_id` as given; without one, the group's first lens.
    if body.model_id:
        state.group_for_lens(body.model_id)
        return body.model_id
    return mapping.first_lens_of(state, body.model_group)


async def _submit(request: Request, spec: JobSpec, body: Any) -> Queued:
    state: IngressState = request.app.state.ingress
    runner: JobRunner = request.app.state.jobs
    admit(state, spec.lens_id, body, f"slim {spec.kind}")
    view = await runner.submit(spec, job_owner(request, request.app.state.guard))
    position = view["queue_position"]
    return Queued(
        request_id=view["job_id"],
        status="queued",
        queue_position=position,
        message=f"{WHAT[spec.kind]} request queued at position {position}",
    )


@router.get("", summary="What the slim API offers")
@router.get("/", include_in_schema=False)
async def slim_info() -> dict[str, Any]:
    """List the slim API's endpoints."""
    names = ("generate", "analyze", "send_message", "status/{request_id}", "models")
    return {
        "name": "lens-serve slim API (compatible with the old backend's)",
        "endpoints": {name.split("/")[0]: f"/api/slim/{name}" for name in names}
        | {"layers": "/api/slim/models/{group_id}/layers"},
    }


@router.get("/models", summary="Model groups and their default lens")
async def slim_models(request: Request) -> dict[str, Any]:
    """List groups as `model_groups` with `default_layer` (the group's first lens)."""
    state: IngressState = request.app.state.ingress
    return catalog.slim_models(state, await state.snapshots())


@router.get(
    "/models/{identifier}/layers",
    responses={404: {"model": ErrorBody}},
    summary="The lenses of a group (by group id or by one of its lens ids)",
)
async def slim_layers(identifier: str, request: Request) -> dict[str, Any]:
    """Every lens of the group as `layers`, with `is_current` from real residency."""
    state: IngressState = request.app.state.ingress
    if identifier in state.groups:
        group = state.groups[identifier]
    elif identifier in state.group_of_lens:
        group = state.group_of_lens[identifier]
    else:
        raise UnknownLens(identifier)
    return catalog.slim_layers(state, group, await state.snapshots())


@router.post(
    "/analyze",
    response_model=Queued,
    response_model_exclude_none=True,
    responses=SUBMIT_ERRORS,
    summary="Queue an analysis of chat messages",
)
async def slim_analyze(body: SlimAnalyzeRequest, request: Request) -> Queued:
    """Analyse `messages` (chat template applied) with the slim defaults."""
    lens_id = _lens_for(request.app.state.ingress, body)
    options: dict[str, Any] = {
        "temperature": 1.0,
        "seed": DEFAULT_SEED,
        "best_of_k": body.best_of_k,
        "calculate_salience": body.calculate_token_salience,
        "kl": False,
        "return_structured": True,
    }
    if body.last_n_messages is not None:
        options["last_n_messages"] = body.last_n_messages
    inputs = {"messages": mapping.slim_messages(body.messages)}
    spec, v2 = mapping.analysis_spec(lens_id, inputs, options, {"route": "slim"})
    return await _submit(request, spec, v2)


@router.post(
    "/generate",
    response_model=Queued,
    response_model_exclude_none=True,
    responses=SUBMIT_ERRORS,
    summary="Queue continuations of chat messages",
)
async def slim_generate(body: SlimGenerateRequest, request: Request) -> Queued:
    """`n_continuations` continuations of `n_tokens` tokens each."""
    lens_id = _lens_for(request.app.state.ingress, body)
    fields = {
        "max_new_tokens": body.n_tokens,
        "temperature": body.temperature,
        "num_continuations": body.n_continuations,
        "seed": DEFAULT_SEED,
    }
    inputs = {"messages": mapping.slim_messages(body.messages)}
    spec, v2 = mapping.generation_spec(lens_id, inputs, fields, {"route": "slim"})
    return await _submit(request, spec, v2)


@router.post(
    "/send_message",
    response_model=Queued,
    response_model_exclude_none=True,
    responses=SUBMIT_ERRORS,
    summary="Queue one assistant reply",
)
async def slim_send_message(body: SlimSendMessageRequest, request: Request) -> Queued:
    """One reply, ending at the model's end-of-turn marker; `result.response` holds it."""
    lens_id = _lens_for(request.app.state.ingress, body)
    v2 = SendMessageRequest(
        messages=mapping.slim_messages(body.messages),
        max_new_tokens=body.max_tokens,
        temperature=body.temperature,
    )
    request_body = {"kind": "send_message", "lens_id": lens_id, **v2.model_dump()}
    spec = JobSpec(
        "send_message", lens_id, v2.replica_body(), {**request_body, "legacy": {"route": "slim"}}
    )
    return await _submit(request, spec, v2)


@router.get(
    "/status/{request_id}",
    responses={404: {"model": ErrorBody}, 410: {"model": ErrorBody}},
    summary="Status and result of a slim request",
)
async def slim_status(request_id: str, request: Request) -> dict[str, Any]:
    """`status`, `result` once completed, `error` once failed, `processing_time`."""
    runner: JobRunner = request.app.state.jobs
    view = await runner.get(request_id, job_owner(request, request.app.state.guard))
    body = mapping.status_body(request.app.state.ingress, view)
    return {
        "request_id": body["request_id"],
        "status": body["status"],
        "result": body["result"],
        "error": body["error"] if body["status"] in ("failed", "cancelled") else None,
        "processing_time": body["processing_time"],
    }
