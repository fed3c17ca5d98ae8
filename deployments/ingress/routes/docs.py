"""`/docs` and `/openapi.json` behind the API key, when keys are on (app arg `public_docs`).

The API description names every lens route and error: with keys on it is as private as the
API itself. FastAPI's own open routes are switched off in `server.py`; these replace them.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from deployments.ingress.auth import require_api_key
from deployments.ingress.schemas import AUTH_ERRORS


def keyed_docs_router(app: FastAPI) -> APIRouter:
    """Return a router serving `app`'s OpenAPI document and Swagger page behind the key."""
    router = APIRouter(
        tags=["docs"], dependencies=[Depends(require_api_key)], responses=AUTH_ERRORS
    )

    @router.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="openapi.json", title="lens-serve API")

    return router
