"""`/api/v2/lenses`: lens info, analyze (JSON or NDJSON stream) and generate."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentResponseGenerator

from deployments.api.groups import residency_of
from deployments.auth import check_text_length, require_api_key
from deployments.errors import body_for
from deployments.ingress import IngressState, cancel_quietly
from deployments.schemas import (
    AUTH_ERRORS,
    AnalyzeRequest,
    AnalyzeResponse,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    LensDetail,
    LensList,
    LensSizes,
)

logger = logging.getLogger("ray.serve")

router = APIRouter(
    prefix="/api/v2/lenses",
    tags=["lenses"],
    dependencies=[Depends(require_api_key)],
    responses=AUTH_ERRORS,
)

NDJSON_MEDIA_TYPE = "application/x-ndjson"

# The errors a lens call can end in (STYLE §2: `/docs` shows the error shape too).
CALL_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 409, 413, 422, 429, 503, 504)
}


def lens_detail(state: IngressState, lens_id: str, replicas: list[dict[str, Any]]) -> LensDetail:
    """One lens: group, layer, t_text, donor, sizes and residency."""
    group = state.group_for_lens(lens_id)
    lens = group.lens(lens_id)
    sizes = state.sizes[group.group_id]
    size = sizes.lenses[lens_id]
    return LensDetail(
        lens_id=lens_id,
        group_id=group.group_id,
        name=lens.name,
        layer=lens.layer,
        t_text=size.t_text,
        donor=lens.donor,
        bytes=size.tensor_bytes,
        visible=lens.visible,
        residency=residency_of(replicas).get(lens_id, []),
        sizes=LensSizes(
            lens_bytes=size.tensor_bytes,
            checkpoint_file_bytes=size.file_bytes,
            base_bytes=sizes.base_bytes,
            donor_bytes=sizes.donor_bytes.get(lens.donor, 0) if lens.donor else 0,
        ),
        problem=size.problem,
    )


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


def admit(
    state: IngressState, lens_id: str, body: AnalyzeRequest | GenerateRequest, what: str
) -> str:
    """Check the lens id and the text length, log the request; return the group id."""
    group = state.group_for_lens(lens_id)
    length = body.input_length()
    check_text_length(length, state.args.max_text_length)
    if state.args.log_request_text:
        logger.info("%s lens=%s input=%r", what, lens_id, body.input_dict())
    else:
        logger.info("%s lens=%s chars=%d", what, lens_id, length)
    return group.group_id


def _line(item: dict[str, Any]) -> bytes:
    return (json.dumps(item, separators=(",", ":")) + "\n").encode()


async def ndjson_lines(first: Any, stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """Yield the replica's events as NDJSON lines; a failure mid-stream is an `error` event.

    Closing this iterator (the client went away) cancels the replica's generator, which stops
    the analysis between batches.
    """
    try:
        if first is not None:
            yield _line(first)
        async for item in stream:
            yield _line(item)
    except Exception as exc:  # the status line is sent: report it in-band
        yield _line({"event": "error", **body_for(exc)})
    finally:
        cancel_quietly(stream)


async def open_analysis(
    state: IngressState, lens_id: str, body: AnalyzeRequest
) -> tuple[Any, DeploymentResponseGenerator]:
    """Start `analyze_stream` on the lens's group and wait for its first event."""
    return await state.open_stream(lens_id, "analyze_stream", body.replica_body())


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
    state: IngressState = request.app.state.ingress
    group_id = admit(state, lens_id, body, "analyze")
    if stream or body.stream:
        first, events = await open_analysis(state, lens_id, body)
        return StreamingResponse(ndjson_lines(first, events), media_type=NDJSON_MEDIA_TYPE)
    result = await state.call(lens_id, "analyze", body.replica_body())
    result["meta"].setdefault("group_id", group_id)
    return result


@router.post(
    "/{lens_id}/generate",
    response_model=GenerateResponse,
    response_model_exclude_unset=True,
    responses=CALL_ERRORS,
    summary="Continue text with the lens's activation model",
)
async def generate(lens_id: str, body: GenerateRequest, request: Request) -> Any:
    """Continuations of `text` / `messages` from the base (or the lens's donor)."""
    state: IngressState = request.app.state.ingress
    group_id = admit(state, lens_id, body, "generate")
    result = await state.call(lens_id, "generate", body.replica_body())
    result.setdefault("meta", {}).setdefault("group_id", group_id)
    return result
