"""On-disk checks of what group files name: bases, donors and lens checkpoints.

After `group_files.load_groups` has read the files: `lens-serve validate` runs these strictly
(DESIGN §Model groups), and `build_app` runs them at start-up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache

from deployments.config import HUB_ID, DonorSpec, GroupSpec, LensSpec
from deployments.group_files import read_groups
from lenscore import LensError, check_compat, read_base_info, read_checkpoint

logger = logging.getLogger(__name__)

def validate_groups(groups_dir: Path | str) -> list[str]:
    """Return every problem of the group files in `groups_dir`, one line each; [] when fine.

    Strict (`lens-serve validate`): the files, then every base, donor and checkpoint that the
    valid ones name.
    """
    loaded, problems = read_groups(groups_dir)
    for group, shown in loaded:
        problems += check_group_files(group, shown)
    return problems


def _check_readable(path: Path, field: str, shown: str) -> str | None:
    """Return a problem line when `path` is missing or unreadable, else None."""
    if not path.exists():
        return f"{shown}: {field}: {path} does not exist"
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        return f"{shown}: {field}: {path} is not readable"
    return None


def _is_cached_hub_id(path: Path) -> bool:
    if path.is_absolute() or not HUB_ID.match(str(path)):
        return False
    return isinstance(try_to_load_from_cache(str(path), "config.json"), str)


def check_group_files(group: GroupSpec, shown: str) -> list[str]:
    """Check one group's base, donors and checkpoints on disk, with lenscore; [] when fine.

    `shown` is the file name used at the start of each line.
    """
    base_info = None
    problem = None
    if not _is_cached_hub_id(group.base_model):
        problem = _check_readable(group.base_model, "base_model", shown)
    if problem:
        problems = [problem]
    else:
        problems = []
        try:
            base_info = read_base_info(group.base_model)
        except (LensError, OSError, ValueError) as exc:
            problems.append(f"{shown}: base_model: cannot read {group.base_model}: {exc}")
    for i, donor in enumerate(group.donors):
        problems += _check_donor(donor, base_info, f"donors[{i}].path", shown)
    for i, lens in enumerate(group.lenses):
        problems += _check_lens(lens, base_info, f"lenses[{i}]", shown)
    return problems


def _check_donor(donor: DonorSpec, base_info: Any, field: str, shown: str) -> list[str]:
    problem = _check_readable(donor.path, field, shown)
    if problem:
        return [problem]
    try:
        info = read_base_info(donor.path)
    except (LensError, OSError, ValueError) as exc:
        return [f"{shown}: {field}: cannot read donor {donor.donor_id!r}: {exc}"]
    if base_info is None:
        return []
    problems = []
    for attr, what in (
        ("model_type", "model_type"),
        ("d", "hidden size"),
        ("n_layers", "layer count"),
        ("vocab_size", "vocabulary size"),
    ):
        mine, base = getattr(info, attr), getattr(base_info, attr)
        if mine != base:
            problems.append(
                f"{shown}: {field}: donor {donor.donor_id!r} has {what} {mine!r}, "
                f"the base has {base!r}"
            )
    return problems


def _check_lens(lens: LensSpec, base_info: Any, field: str, shown: str) -> list[str]:
    problem = _check_readable(lens.checkpoint, f"{field}.checkpoint", shown)
    if problem:
        return [problem]
    try:
        raw = read_checkpoint(lens.checkpoint)
    except LensError as exc:
        return [f"{shown}: {field}.checkpoint: {exc.message}"]
    for skipped, why in raw.fell_back_from:
        logger.warning(
            "%s: %s.checkpoint: skipped %s (%s), using %s", shown, field, skipped, why, raw.path
        )
    problems = []
    if raw.layer_l != lens.layer:
        problems.append(
            f"{shown}: {field}.layer: {lens.layer} does not match the checkpoint's "
            f"layer_l {raw.layer_l} ({raw.path})"
        )
    if base_info is not None:
        problems += [f"{shown}: {field}.checkpoint: {p}" for p in check_compat(raw, base_info)]
    return problems
