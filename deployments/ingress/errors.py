"""Error codes to HTTP statuses, and the one JSON error shape the router writes.

Every failure leaves the router as `{"error": {"code", "message", "detail"}}` (DESIGN §HTTP
API). Replicas raise lenscore `LensError`s; Serve hands them back wrapped in a `RayTaskError`,
and Serve's own failures (back-pressure, a dead replica) arrive as Ray exceptions: `translate`
turns all of them into `LensError`s before a handler sees them.

Status choices that are not obvious:

- A lens whose checkpoint is corrupt, missing, refused or incompatible **at load time** is a
  409: the request was fine, the lens is in a state that conflicts with serving it. The code
  stays the lenscore code (`corrupt_checkpoint`, ...), so clients can tell the causes apart.
- `bad_input` (schema violations, a text of fewer than 2 tokens, bad options) is 422; a body
  that is not JSON at all is 400 `malformed_json`.
- `out_of_memory`, `overloaded` (Serve's `max_queued_requests` exceeded) and
  `replica_unavailable` (a replica died mid-request) are 503 with `Retry-After`.
- `cancelled` is 499 (client closed request); the client has usually gone by then.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lenscore import Cancelled, LensError

logger = logging.getLogger("ray.serve")

STATUS: dict[str, int] = {
    "malformed_json": 400,
    "unauthorized": 401,
    "origin_not_allowed": 403,
    "host_not_allowed": 403,
    "not_found": 404,
    "unknown_lens": 404,
    "unknown_group": 404,
    "unknown_job": 404,
    "method_not_allowed": 405,
    "job_expired": 410,
    "incompatible_lens": 409,
    "corrupt_checkpoint": 409,
    "missing_checkpoint": 409,
    "checkpoint_refused": 409,
    # Only a donor reaches a request this way (a base that fails stops its replica's start).
    "base_unavailable": 409,
    "text_too_long": 413,
    "bad_input": 422,
    "rate_limited": 429,
    "cancelled": 499,
    "internal": 500,
    "not_ready": 503,
    "group_unavailable": 503,
    "out_of_memory": 503,
    "overloaded": 503,
    "replica_unavailable": 503,
    "timeout": 504,
}

# Seconds a client should wait before retrying, when the failure itself does not say.
RETRY_AFTER_SECONDS: dict[str, float] = {
    "out_of_memory": 5.0,
    "overloaded": 1.0,
    "replica_unavailable": 5.0,
    "rate_limited": 1.0,
    "not_ready": 2.0,
    "group_unavailable": 60.0,
}


class ApiError(LensError):
    """A failure found by the router itself; `retry_after_s` becomes `Retry-After`."""

    def __init__(
        self,
        message: str,
        detail: dict[str, Any] | None = None,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, detail)
        self.retry_after_s = retry_after_s


class UnknownLens(ApiError):
    """No group file names this lens id."""

    code = "unknown_lens"

    def __init__(self, lens_id: str, *, group_id: str | None = None) -> None:
        shown = _clip(lens_id)
        where = f" in group {group_id!r}" if group_id else ""
        super().__init__(
            f"unknown lens_id {shown!r}{where}; GET /api/v2/lenses lists the lens ids",
            {"lens_id": shown, "list_endpoint": "/api/v2/lenses"},
        )


class UnknownGroup(ApiError):
    """No group file has this group id."""

    code = "unknown_group"

    def __init__(self, group_id: str) -> None:
        shown = _clip(group_id)
        super().__init__(
            f"unknown group_id {shown!r}; GET /api/v2/groups lists the groups",
            {"group_id": shown, "list_endpoint": "/api/v2/groups"},
        )


class Unauthorized(ApiError):
    """Missing or wrong API key."""

    code = "unauthorized"


class OriginNotAllowed(ApiError):
    """A browser sent a state-changing request from a page of another site."""

    code = "origin_not_allowed"


class HostNotAllowed(ApiError):
    """A request addressed to a host name that is not allowed while API keys are off."""

    code = "host_not_allowed"


class RateLimited(ApiError):
    """The key (or client address) used up its requests per minute."""

    code = "rate_limited"


class Overloaded(ApiError):
    """The group's queue is full (Serve's `max_queued_requests`)."""

    code = "overloaded"


class ReplicaUnavailable(ApiError):
    """The replica died or the deployment cannot take requests right now."""

    code = "replica_unavailable"


class GroupUnavailable(ApiError):
    """The group's base could not load at start-up: nothing in it serves."""

    code = "group_unavailable"

    def __init__(self, group_id: str, why: str) -> None:
        super().__init__(
            f"group {group_id} is unavailable: {why}; fix it and redeploy "
            "(`lens-serve validate` lists every problem)",
            {"group_id": group_id, "reason": why},
        )


class NotReady(ApiError):
    """The router has not finished starting (sizes not measured yet)."""

    code = "not_ready"


class RequestTimeout(ApiError):
    """The replica did not answer within `request_timeout_s`."""

    code = "timeout"


def _clip(value: str, limit: int = 100) -> str:
    # Ids are echoed back in messages; a 1 MB "id" should not be.
    return value if len(value) <= limit else value[:limit] + "..."


def translate(exc: BaseException) -> BaseException:
    """Turn what a `DeploymentHandle` call raised into a `LensError` where we know it.

    A replica's `LensError` arrives as a `RayTaskError` subclassing the cause's class, but its
    `str()` is the remote traceback, so the cause itself is returned. Unknown exceptions come
    back unchanged (they become a 500).
    """
    while isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    if isinstance(exc, LensError):
        return exc
    if isinstance(exc, BackPressureError):
        return Overloaded(
            f"the group's request queue is full: {exc.message} Retry later.",
            retry_after_s=exc.retry_after_s or RETRY_AFTER_SECONDS["overloaded"],
        )
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return ReplicaUnavailable(
            "the replica serving this request is unavailable (it died or is restarting); "
            "retry later",
            retry_after_s=RETRY_AFTER_SECONDS["replica_unavailable"],
        )
    if isinstance(exc, TaskCancelledError):
        return Cancelled("the request was cancelled")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return RequestTimeout("the group did not answer in time")
    return exc


def status_of(exc: LensError) -> int:
    """HTTP status for a `LensError`'s code (500 for codes not in `STATUS`)."""
    return STATUS.get(exc.code, 500)


def error_body(exc: LensError) -> dict[str, Any]:
    """Return the `{"error": {...}}` object (also sent inside NDJSON, SSE and WebSocket)."""
    return {
        "error": {
            "code": exc.code,
            "message": exc.message,
            "detail": jsonable_encoder(exc.detail),
        }
    }


def retry_after_of(exc: LensError) -> float | None:
    """Seconds for `Retry-After`, or None when the status is not a retryable one."""
    value = getattr(exc, "retry_after_s", None)
    if value is None:
        value = RETRY_AFTER_SECONDS.get(exc.code)
    return value


def error_response(exc: LensError) -> JSONResponse:
    """Return the JSON response for a `LensError`, with `Retry-After` on 429 and 503."""
    headers = {}
    retry_after_s = retry_after_of(exc)
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return JSONResponse(error_body(exc), status_code=status_of(exc), headers=headers)


def internal_error_body(exc: BaseException) -> dict[str, Any]:
    """Return a 500's body: only a request id; the traceback goes to the log under that id."""
    request_id = uuid.uuid4().hex
    logger.error("request %s failed", request_id, exc_info=exc)
    return {
        "error": {
            "code": "internal",
            "message": f"internal error; quote request id {request_id} to the operator",
            "detail": {"request_id": request_id},
        }
    }


def internal_error_response(exc: BaseException) -> JSONResponse:
    """Return a 500 whose body carries only a request id."""
    return JSONResponse(internal_error_body(exc), status_code=500)


def body_for(exc: BaseException) -> dict[str, Any]:
    """Error body for any exception (translated first): a `LensError`'s, else a 500's."""
    translated = translate(exc)
    if isinstance(translated, LensError):
        return error_body(translated)
    return internal_error_body(exc)


async def _on_exception(_: Request, exc: Exception) -> JSONResponse:
    translated = translate(exc)
    if isinstance(translated, LensError):
        return error_response(translated)
    return internal_error_response(exc)


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type")}
        for err in exc.errors()
    ]
    if any(problem["type"] == "json_invalid" for problem in problems):
        code, message = "malformed_json", "the request body is not valid JSON"
    else:
        code = "bad_input"
        message = "; ".join(
            f"{'.'.join(str(part) for part in p['loc'])}: {p['msg']}" for p in problems
        )
    body = {"error": {"code": code, "message": message, "detail": {"problems": problems}}}
    return JSONResponse(jsonable_encoder(body), status_code=STATUS[code])


async def _on_http_exception(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
    code = codes.get(exc.status_code, "http_error")
    body = {"error": {"code": code, "message": str(exc.detail), "detail": {}}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error response the one JSON shape."""
    app.add_exception_handler(LensError, _on_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_exception)
