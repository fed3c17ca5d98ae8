"""Liveness, readiness and the web page: the only routes that need no API key."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
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
    page = FRONTEND_DIR / "index.html"
    return FileResponse(page, media_type="text/html",
                        headers={"Content-Security-Policy": page_policy(page)})  # fmt: skip


@functools.cache
def page_policy(page: Path) -> str:
    """Return the page's Content-Security-Policy: its files and inline script, by hash.

    Model output and lens names are shown as text, never as markup, so this is the second
    line: a script that got in anyway could neither load code from elsewhere nor send data
    to another site, and no other site may frame the page (clickjacking).
    """
    inline = re.findall(r"<script>(.*?)</script>", page.read_text(), flags=re.DOTALL)
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(code.encode()).digest()).decode() + "'"
        for code in inline
    )
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
        "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
    )
