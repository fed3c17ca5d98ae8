"""Analysis options (LENS_FORMAT.md §Analysis options): bounds are errors, never clamps.

`BOUNDS` is the one table of option bounds: `AnalysisOptions.validate`, `generate`, the HTTP
schemas (deployments/ingress/schemas.py), the CLI and docs/LENS_FORMAT.md (checked by a
test) all read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from lenscore.errors import BadInput


@dataclass(frozen=True)
class Bound:
    """Allowed values of one numeric option: `low`..`high`, `low` excluded when `low_open`."""

    low: float
    high: float | None
    integer: bool
    low_open: bool = False

    def allows(self, value: Any) -> bool:
        """Tell whether `value` is of the right type and within bounds."""
        if not (_is_int(value) if self.integer else _is_number(value)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)

    def text(self) -> str:
        """Write the bounds as messages and docs show them, e.g. `1..64` or `(0, 2]`."""
        high = "" if self.high is None else _number_text(self.high)
        if self.low_open:
            return f"({_number_text(self.low)}, {high}]"
        return f"{_number_text(self.low)}..{high}"


BOUNDS: dict[str, Bound] = {
    "temperature": Bound(0.0, 2.0, integer=False),
    "optimize_temperature": Bound(0.0, 2.0, integer=False, low_open=True),
    "best_of_k": Bound(1, 64, integer=True),
    # Rows per decode pass: past a few hundred nothing gets faster, only riskier on memory.
    "batch_size": Bound(1, 512, integer=True),
    "seed": Bound(0, 2**63 - 1, integer=True),
    "last_n_messages": Bound(1, None, integer=True),
    "max_new_tokens": Bound(1, 1024, integer=True),
    "num_continuations": Bound(1, 16, integer=True),
}
MAX_TEMPERATURE = BOUNDS["temperature"].high
MAX_BEST_OF_K = BOUNDS["best_of_k"].high
MAX_BATCH_SIZE = BOUNDS["batch_size"].high


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
        problems = [
            f"{name} must be {'an integer' if bound.integer else 'a number'} within "
            f"{bound.text()}"
            for name, bound in BOUNDS.items()
            if name in _OPTION_NAMES
            and (value := getattr(self, name)) is not None
            and not bound.allows(value)
        ]
        if self.positions is not None and not all(_is_int(p) and p >= 0 for p in self.positions):
            problems.append("positions must be non-negative integers")
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


def check_bound(name: str, value: Any) -> None:
    """Raise BadInput unless `value` is within `BOUNDS[name]`."""
    bound = BOUNDS[name]
    if not bound.allows(value):
        kind = "an integer" if bound.integer else "a number"
        raise BadInput(f"{name} must be {kind} within {bound.text()}", {"option": name})


def _number_text(value: float) -> str:
    return "2**63-1" if value == 2**63 - 1 else f"{value:g}"


_OPTION_NAMES = {f.name for f in fields(AnalysisOptions)}
