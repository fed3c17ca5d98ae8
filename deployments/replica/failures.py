"""Failed lens loads on one replica and their back-off (DESIGN "Degraded, never dead").

Used by `LensResidency`: a lens whose load failed answers with the same error until its
back-off ends, then the next request tries the file again (it may have been fixed).
"""

from __future__ import annotations

import copy
import dataclasses
import time

from deployments.replica.status import LensFailure
from lenscore import LensError, OutOfDeviceMemory

# A failed lens load is retried after this back-off, doubled per failure (or on a preload).
RETRY_AFTER_SECONDS = 5.0
MAX_RETRY_AFTER_SECONDS = 300.0


@dataclasses.dataclass
class _Failure:
    error: LensError
    attempts: int
    retry_at: float


class LoadFailures:
    """The last load error of each failed lens, with its back-off."""

    def __init__(self) -> None:
        self._failed: dict[str, _Failure] = {}

    def __contains__(self, lens_id: object) -> bool:
        return lens_id in self._failed

    def check(self, lens_id: str) -> None:
        """Raise the lens's last load error again while its back-off runs."""
        failure = self._failed.get(lens_id)
        if failure is not None and time.monotonic() < failure.retry_at:
            raise copy.copy(failure.error)

    def record(self, lens_id: str, exc: LensError) -> float | None:
        """Remember a failed load; return its back-off in seconds (None: not the lens's fault)."""
        if isinstance(exc, OutOfDeviceMemory):
            return None  # memory frees up; the next request may fit
        previous = self._failed.get(lens_id)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(RETRY_AFTER_SECONDS * 2 ** (attempts - 1), MAX_RETRY_AFTER_SECONDS)
        self._failed[lens_id] = _Failure(exc, attempts, time.monotonic() + delay)
        return delay

    def clear(self, lens_id: str) -> None:
        """Forget the lens's failure (it loaded, or a preload retries it now)."""
        self._failed.pop(lens_id, None)

    def report(self) -> dict[str, LensFailure]:
        """Failed lenses with their error code, message and the back-off left."""
        now = time.monotonic()
        return {
            lens_id: LensFailure(
                code=f.error.code,
                message=f.error.message,
                retry_in_seconds=round(max(0.0, f.retry_at - now), 3),
            )
            for lens_id, f in self._failed.items()
        }
