"""`GET /metrics`: Prometheus text of the router process.

Replica metrics are exported by Ray's own metrics endpoint (`ray_lens_*`), not here.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deployments.ingress.auth import require_api_key
from deployments.ingress.schemas import AUTH_ERRORS, ErrorBody
from deployments.ingress.state import IngressState

router = APIRouter(
    tags=["metrics"],
    dependencies=[Depends(require_api_key)],
    responses=AUTH_ERRORS,
)


@router.get(
    "/metrics",
    response_class=Response,
    response_model=None,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: {"model": ErrorBody}},
    summary="Prometheus text of the router process",
)
async def metrics(request: Request) -> Response:
    """Router requests by route and status, cold starts, process stats."""
    state: IngressState = request.app.state.ingress
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
