"""`/api/v2/lenses`: lens info, analyze (JSON or NDJSON stream), generate and send_message."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic_core import to_json

from deployments.ingress.auth import require_api_key
from deployments.ingress.calls import NDJSON_MEDIA_TYPE, admit, ndjson_lines, open_analysis
from deployments.ingress.catalog import lens_detail
from deployments.ingress.job_schemas import SendMessageRequest, SendMessageResponse
from deployments.ingress.schemas import (
    AUTH_ERRORS,
    AnalyzeRequest,
    AnalyzeResponse,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    LensDetail,
    LensList,
)
from deployments.ingress.state import IngressState

router = APIRouter(
    prefix="/api/v2/lenses",
    tags=["lenses"],
    dependencies=[Depends(require_api_key)],
    responses=AUTH_ERRORS,
)

# The errors a lens call can end in (STYLE §2: `/docs` shows the error shape too).
CALL_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 409, 413, 422, 429, 503, 504)
}


def json_response(result: dict[str, Any]) -> Response:
    """Serialise a replica's result as it is.

    The replica built it from lenscore's rows, so FastAPI's re-validation against
    `response_model` (kept for /docs) would only cost time: about 2-5 ms per 100 rows.
    NaN and infinities become null, as pydantic writes them.
    """
    return Response(to_json(result, inf_nan_mode="null"), media_type="application/json")


async def relay(request: Request, lens_id: str, body: Any, method: str) -> Response:
    """Admit the request, call `method` on the lens's replica, answer its result as it is.

    The replica's result is serialised once, without validating it again
    (`json_response`); `meta.group_id` is filled in if the replica left it out.
    """
    state: IngressState = request.app.state.ingress
    group_id = admit(state, lens_id, body, method)
    result = await state.call(lens_id, method, body.replica_body())
    result.setdefault("meta", {}).setdefault("group_id", group_id)
    return json_response(result)


@router.get("", response_model=LensList, summary="Every lens id and where it is served")
async def list_lenses(request: Request) -> LensList:
    """Every lens of every group, with sizes and residency."""
    state: IngressState = request.app.state.ingress
    snapshots = await state.snapshots()
    return LensList(
        lenses=[
            lens_detail(state, lens_id, snapshots.get(group.group_id, []))
            for lens_id, group in state.group_of_lens.items()
        ]
    )


@router.get(
    "/{lens_id}",
    response_model=LensDetail,
    responses={404: {"model": ErrorBody}},
    summary="One lens",
)
async def get_lens(lens_id: str, request: Request) -> LensDetail:
    """Group, layer, t_text, donor, sizes and residency of one lens."""
    state: IngressState = request.app.state.ingress
    group = state.group_for_lens(lens_id)
    snapshots = await state.snapshots()
    return lens_detail(state, lens_id, snapshots.get(group.group_id, []))


@router.post(
    "/{lens_id}/analyze",
    response_model=AnalyzeResponse,
    response_model_exclude_unset=True,
    responses={
        **CALL_ERRORS,
        200: {
            "content": {NDJSON_MEDIA_TYPE: {}},
            "description": "JSON; with stream=true, NDJSON events: progress*, meta, row*, done",
        },
    },
    summary="Analyse text or chat messages with one lens",
)
async def analyze(
    lens_id: str,
    body: AnalyzeRequest,
    request: Request,
    stream: bool = Query(False, description="Stream NDJSON progress, meta and rows."),
) -> Any:
    """One row per token (LENS_FORMAT §Result row); `stream=true` streams NDJSON events."""
    if stream or body.stream:
        state: IngressState = request.app.state.ingress
        admit(state, lens_id, body, "analyze")
        first, events = await open_analysis(state, lens_id, body)
        return StreamingResponse(ndjson_lines(first, events), media_type=NDJSON_MEDIA_TYPE)
    return await relay(request, lens_id, body, "analyze")


@router.post(
    "/{lens_id}/generate",
    response_model=GenerateResponse,
    response_model_exclude_unset=True,
    responses=CALL_ERRORS,
    summary="Continue text with the lens's activation model",
)
async def generate(lens_id: str, body: GenerateRequest, request: Request) -> Any:
    """Continuations of `text` / `messages` from the base (or the lens's donor)."""
    return await relay(request, lens_id, body, "generate")


@router.post(
    "/{lens_id}/send_message",
    response_model=SendMessageResponse,
    response_model_exclude_unset=True,
    responses=CALL_ERRORS,
    summary="One assistant reply from the lens's activation model",
)
async def send_message(lens_id: str, body: SendMessageRequest, request: Request) -> Any:
    """Render `messages` with the chat template and reply until the end-of-turn marker."""
    return await relay(request, lens_id, body, "send_message")
