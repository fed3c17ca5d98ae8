"""lensclient: a light Python client of lens-serve (httpx + pandas, no torch).

`LensClient` / `AsyncLensClient` call the v2 API; analyses come back as pandas DataFrames,
long work as durable jobs (`submit` -> `Job.result()`); every failure raises a typed
`LensAPIError` carrying the API's error code.
"""

from lensclient.aio import AsyncJob, AsyncLensClient
from lensclient.client import Job, LensClient
from lensclient.errors import (
    BadRequest,
    Cancelled,
    Conflict,
    JobExpired,
    JobFailed,
    LensAPIError,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from lensclient.frames import analysis_frame

__all__ = [
    "AsyncJob",
    "AsyncLensClient",
    "BadRequest",
    "Cancelled",
    "Conflict",
    "Job",
    "JobExpired",
    "JobFailed",
    "LensAPIError",
    "LensClient",
    "NotFound",
    "RateLimited",
    "Unauthorized",
    "Unavailable",
    "analysis_frame",
]
