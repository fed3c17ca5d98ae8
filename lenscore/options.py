"""Analysis options (LENS_FORMAT.md §Analysis options): bounds are errors, never clamps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from lenscore.errors import BadInput

MAX_TEMPERATURE = 2.0
MAX_BEST_OF_K = 64
MAX_BATCH_SIZE = 4096


@dataclass(frozen=True)
class AnalysisOptions:
    """What one analysis computes; defaults follow LENS_FORMAT.md."""

    temperature: float = 1.0
    seed: int | None = None
    best_of_k: int = 1
    optimize_temperature: float | None = None
    calculate_salience: bool = True
    logit_lens: bool = False
    kl: bool = False
    batch_size: int | None = None
    positions: tuple[int, ...] | None = None
    last_n_messages: int | None = None
    return_structured: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> AnalysisOptions:
        """Build from a JSON-like dict; unknown keys are a BadInput, not ignored."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BadInput(f"unknown analysis option(s): {', '.join(unknown)}")
        if values.get("positions") is not None:
            values["positions"] = tuple(values["positions"])
        options = cls(**values)
        options.validate()
        return options

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every option."""
        out = dataclasses.asdict(self)
        if self.positions is not None:
            out["positions"] = list(self.positions)
        return out

    def validate(self) -> None:
        """Raise BadInput naming every option out of bounds."""
        problems = []
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            problems.append(f"temperature must be within 0..{MAX_TEMPERATURE}")
        opt = self.optimize_temperature
        if opt is not None and (not _is_number(opt) or not 0 < opt <= MAX_TEMPERATURE):
            problems.append(f"optimize_temperature must be within (0, {MAX_TEMPERATURE}]")
        if not _is_int(self.best_of_k) or not 1 <= self.best_of_k <= MAX_BEST_OF_K:
            problems.append(f"best_of_k must be an integer within 1..{MAX_BEST_OF_K}")
        if self.batch_size is not None and (
            not _is_int(self.batch_size) or not 1 <= self.batch_size <= MAX_BATCH_SIZE
        ):
            problems.append(f"batch_size must be an integer within 1..{MAX_BATCH_SIZE}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            problems.append("seed must be an integer within 0..2**63-1")
        if self.positions is not None and not all(_is_int(p) and p >= 0 for p in self.positions):
            problems.append("positions must be non-negative integers")
        if self.last_n_messages is not None and (
            not _is_int(self.last_n_messages) or self.last_n_messages < 1
        ):
            problems.append("last_n_messages must be a positive integer")
        if self.positions is not None and self.last_n_messages is not None:
            problems.append("give positions or last_n_messages, not both")
        if problems:
            raise BadInput("; ".join(problems), {"problems": problems})

    @property
    def sample_temperature(self) -> float:
        """Temperature of the best-of-k draws (the plain temperature when it is > 0)."""
        if self.optimize_temperature is not None:
            return self.optimize_temperature
        return self.temperature if self.temperature > 0 else 1.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
