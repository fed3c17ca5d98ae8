"""Typed errors of the lens-serve API: each carries the API's error code, message and detail.

The server answers every failure as `{"error": {"code", "message", "detail"}}`; `raise_for`
turns such a response into the exception class of its status (and code).
"""

from __future__ import annotations

from typing import Any

import httpx


class LensAPIError(Exception):
    """A failed call: `code` (e.g. `unknown_lens`), `message`, `detail`, HTTP `status`."""

    def __init__(
        self, code: str, message: str, detail: dict[str, Any] | None = None, status: int = 0
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail or {}
        self.status = status


class BadRequest(LensAPIError):
    """The request was refused as given (400, 413, 422): fix the input or options."""


class Unauthorized(LensAPIError):
    """Missing or wrong API key (401)."""


class NotFound(LensAPIError):
    """Unknown lens, group or job (404); a job of another API key reads as unknown too."""


class Conflict(LensAPIError):
    """The lens cannot serve now: corrupt, missing or incompatible checkpoint (409)."""


class JobExpired(LensAPIError):
    """The job's result was dropped after the server's jobs TTL (410)."""


class RateLimited(LensAPIError):
    """Too many requests (429); `retry_after_s` says when to retry."""

    retry_after_s: float | None = None


class Unavailable(LensAPIError):
    """Overloaded, out of memory, a replica gone or a timeout (503, 504): retry later."""

    retry_after_s: float | None = None


class Cancelled(LensAPIError):
    """The request or job was cancelled (499, or a job that ended `cancelled`)."""


class JobFailed(LensAPIError):
    """A job ended `failed`; `code` is the failure's (e.g. `out_of_memory`)."""


_BY_STATUS: dict[int, type[LensAPIError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    410: JobExpired,
    413: BadRequest,
    422: BadRequest,
    429: RateLimited,
    499: Cancelled,
    503: Unavailable,
    504: Unavailable,
}


def error_for(status: int, body: Any, headers: httpx.Headers | None = None) -> LensAPIError:
    """Build the exception for an error response (any body shape)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"code": f"http_{status}", "message": str(body)[:500], "detail": {}}
    cls = _BY_STATUS.get(status, LensAPIError)
    exc = cls(error.get("code", ""), error.get("message", ""), error.get("detail"), status)
    retry_after = (headers or {}).get("retry-after")
    if retry_after is not None and isinstance(exc, (RateLimited, Unavailable)):
        try:
            exc.retry_after_s = float(retry_after)
        except ValueError:
            exc.retry_after_s = None
    return exc


def raise_for(response: httpx.Response) -> None:
    """Raise the typed error of a failed response; return for a success."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = response.text
    raise error_for(response.status_code, body, response.headers)


def job_error(view: dict[str, Any]) -> LensAPIError:
    """Return the exception of a job that ended without a result."""
    error = view.get("error") or {}
    code = error.get("code", view.get("status", "failed"))
    cls = Cancelled if view.get("status") == "cancelled" else JobFailed
    detail = {**(error.get("detail") or {}), "job_id": view.get("job_id")}
    return cls(code, error.get("message", "the job failed"), detail)
