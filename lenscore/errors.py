"""The failures lenscore promises to report, each with a stable code.

Callers above (the CLI, `deployments/errors.py`) map `code` to an exit status or HTTP status;
nothing here knows HTTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class LensError(Exception):
    """A failure we report to the user: a stable `code`, a one-line message, details."""

    code = "lens_error"

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray ships exceptions between processes by pickling; subclasses have other
        # constructor signatures, so rebuild from the stored fields instead.
        return (_rebuild, (type(self), self.message, self.detail))


def _rebuild(cls: type[LensError], message: str, detail: dict[str, Any]) -> LensError:
    err = cls.__new__(cls)
    LensError.__init__(err, message, detail)
    if "problems" in detail:
        err.problems = detail["problems"]
    return err


class CheckpointCorrupt(LensError):
    """The checkpoint file is truncated, not a torch pickle, or lacks `models`/`config`."""

    code = "corrupt_checkpoint"

    def __init__(self, path: Path | str, why: str) -> None:
        super().__init__(f"corrupt checkpoint {path}: {why}", {"path": str(path), "why": why})


class CheckpointRefused(LensError):
    """The checkpoint needs pickled globals outside the allow-list."""

    code = "checkpoint_refused"


class CheckpointMissing(LensError):
    """No checkpoint file at the path, or no `checkpoint_step*` file in the run directory."""

    code = "missing_checkpoint"


class BaseLoadError(LensError):
    """A base or donor directory cannot be read as a causal LM with a tokenizer."""

    code = "base_unavailable"


class IncompatibleLens(LensError):
    """The lens cannot run on the given base; `detail["problems"]` lists every reason."""

    code = "incompatible_lens"

    def __init__(self, subject: str, problems: list[str]) -> None:
        lines = "; ".join(problems)
        super().__init__(f"{subject} is incompatible: {lines}", {"problems": problems})
        self.problems = problems


class BadInput(LensError):
    """The request's text, messages or options cannot be analysed as given."""

    code = "bad_input"


class TextTooLong(LensError):
    """The text is longer than the configured maximum."""

    code = "text_too_long"


class OutOfDeviceMemory(LensError):
    """An allocation failed on the device (or the replica's memory budget ran out)."""

    code = "out_of_memory"


class Cancelled(LensError):
    """The caller asked to stop (client disconnected) between batches."""

    code = "cancelled"
