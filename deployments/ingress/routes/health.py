"""Liveness, readiness and the web page: the only routes that need no API key."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from deployments.ingress.errors import NotReady
from deployments.ingress.schemas import ErrorBody, Health
from deployments.ingress.state import IngressState

router = APIRouter(tags=["health"])

# The static web page and its files (served at `/` and `/static`).
FRONTEND_DIR = Path(__file__).resolve().parents[3] / "frontend"


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Answer while the router process runs."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> Health:
    """Config loaded and sizes measured: the router can route."""
    state: IngressState = request.app.state.ingress
    if not state.is_ready:
        raise NotReady("the router is still starting")
    serving = sorted(g for g in state.groups if g not in state.report.groups)
    return Health(status="ready", groups=serving, unavailable_groups=state.report.groups)


@router.get("/", response_class=FileResponse, include_in_schema=False)
async def index() -> FileResponse:
    """Serve the static web page (it holds no data; every call it makes needs the key)."""
    return FileResponse(FRONTEND_DIR / "index.html", media_type="text/html")
