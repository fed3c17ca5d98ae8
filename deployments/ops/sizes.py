"""Sizes of a group's files as the router reports them (DESIGN §Response shapes).

Measured once at router start-up from the files alone: weight files on disk for bases and
donors, tensor bytes of each lens checkpoint (read memory-mapped, never loaded onto a device).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deployments.config import GroupSpec
from deployments.redact import redact_text
from lenscore import LensError, read_checkpoint

# Weight files counted as a model's size on disk, in order of preference.
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")


@dataclass(frozen=True)
class LensSize:
    """What the router knows of one lens's checkpoint without loading it."""

    tensor_bytes: int | None  # decoder + encoder tensors; None when unreadable
    file_bytes: int | None
    t_text: int | None
    problem: str | None = None


@dataclass(frozen=True)
class GroupSizes:
    """Bytes of a group's base, donors and lenses (DESIGN §Response shapes memory_estimate)."""

    base_bytes: int
    donor_bytes: dict[str, int]
    lenses: dict[str, LensSize]


def weights_bytes_on_disk(model_dir: Path) -> int:
    """Bytes of a model directory's weight files (safetensors, else .bin/.pt); 0 if none."""
    if not model_dir.is_dir():
        return 0
    for pattern in WEIGHT_GLOBS:
        files = list(model_dir.glob(pattern))
        if files:
            return sum(path.stat().st_size for path in files)
    return 0


def measure_lens(checkpoint: Path) -> LensSize:
    """Read one checkpoint's tensor sizes (memory-mapped); a broken one gives its problem."""
    try:
        raw = read_checkpoint(checkpoint)
    except LensError as exc:
        return LensSize(None, None, None, f"{exc.code}: {redact_text(exc.message, [checkpoint])}")
    return LensSize(raw.tensor_bytes, raw.file_bytes, raw.t_text)


def measure_group(group: GroupSpec) -> GroupSizes:
    """Sizes of one group's files; blocking (run it in a thread)."""
    return GroupSizes(
        base_bytes=weights_bytes_on_disk(group.base_model),
        donor_bytes={d.donor_id: weights_bytes_on_disk(d.path) for d in group.donors},
        lenses={lens.lens_id: measure_lens(lens.checkpoint) for lens in group.lenses},
    )
