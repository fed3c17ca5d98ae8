"""On-disk checks of what group files name: bases, donors and lens checkpoints.

After `group_files` has read the files: `lens-serve validate` runs these strictly (DESIGN
§Model groups, one line per problem, exit 2). `build_app` runs them at start-up and, unless
`strict_startup`, serves around what fails: a bad lens is reported unavailable, a group whose
base cannot load is left undeployed; everything else serves (DESIGN "Degraded, never dead").
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache

from deployments.config import HUB_ID, DonorSpec, GroupSpec, LensSpec
from deployments.group_files import read_groups
from deployments.redact import group_paths, redact_text
from lenscore import LensError, check_compat, read_base_info, read_checkpoint

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem of a group: the lenscore-style code, the group-file field, the message."""

    code: str
    field: str
    message: str

    def line(self, shown: str) -> str:
        """`file: field: message`, as `lens-serve validate` prints it."""
        return f"{shown}: {self.field}: {self.message}"


@dataclasses.dataclass(frozen=True)
class GroupProblems:
    """What of one group cannot serve: its base (the whole group), donors, single lenses."""

    base: list[Problem]
    donors: dict[str, list[Problem]]
    lenses: dict[str, list[Problem]]

    def all(self) -> list[Problem]:
        """Every problem, base first, in group-file order."""
        found = list(self.base)
        for problems in self.donors.values():
            found += problems
        for problems in self.lenses.values():
            found += problems
        return found


def validate_groups(groups_dir: Path | str) -> list[str]:
    """Return every problem of the group files in `groups_dir`, one line each; [] when fine.

    Strict (`lens-serve validate`): the files, then every base, donor and checkpoint that the
    valid ones name.
    """
    loaded, problems = read_groups(groups_dir)
    for group, shown in loaded:
        problems += check_group_files(group, shown)
    return problems


def check_group_files(group: GroupSpec, shown: str) -> list[str]:
    """Check one group's base, donors and checkpoints on disk, with lenscore; [] when fine.

    `shown` is the file name used at the start of each line.
    """
    return [problem.line(shown) for problem in find_problems(group).all()]


def find_problems(group: GroupSpec) -> GroupProblems:
    """Read the group's base config, donors and checkpoints; return what is wrong, by part."""
    base_info = None
    base = []
    if _is_cached_hub_id(group.base_model):
        readable = None
    else:
        readable = _check_readable(group.base_model, "base_model", "base_unavailable")
    if readable:
        base.append(readable)
    else:
        try:
            base_info = read_base_info(group.base_model)
        except (LensError, OSError, ValueError) as exc:
            base.append(Problem("base_unavailable", "base_model",
                                f"cannot read {group.base_model}: {exc}"))  # fmt: skip
    donors = {
        donor.donor_id: _check_donor(donor, base_info, f"donors[{i}].path")
        for i, donor in enumerate(group.donors)
    }
    lenses = {
        lens.lens_id: _check_lens(lens, base_info, f"lenses[{i}]")
        for i, lens in enumerate(group.lenses)
    }
    return GroupProblems(base, {k: v for k, v in donors.items() if v},
                         {k: v for k, v in lenses.items() if v})  # fmt: skip


def _check_readable(path: Path, field: str, code: str) -> Problem | None:
    """Return a problem when `path` is missing or unreadable, else None."""
    if not path.exists():
        return Problem(code, field, f"{path} does not exist")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        return Problem(code, field, f"{path} is not readable")
    return None


def _is_cached_hub_id(path: Path) -> bool:
    if path.is_absolute() or not HUB_ID.match(str(path)):
        return False
    return isinstance(try_to_load_from_cache(str(path), "config.json"), str)


def _check_donor(donor: DonorSpec, base_info: Any, field: str) -> list[Problem]:
    problem = _check_readable(donor.path, field, "base_unavailable")
    if problem:
        return [problem]
    try:
        info = read_base_info(donor.path)
    except (LensError, OSError, ValueError) as exc:
        return [Problem("base_unavailable", field, f"cannot read donor {donor.donor_id!r}: {exc}")]
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
            message = f"donor {donor.donor_id!r} has {what} {mine!r}, the base has {base!r}"
            problems.append(Problem("incompatible_lens", field, message))
    return problems


def _check_lens(lens: LensSpec, base_info: Any, field: str) -> list[Problem]:
    problem = _check_readable(lens.checkpoint, f"{field}.checkpoint", "missing_checkpoint")
    if problem:
        return [problem]
    try:
        raw = read_checkpoint(lens.checkpoint)
    except LensError as exc:
        return [Problem(exc.code, f"{field}.checkpoint", exc.message)]
    for skipped, why in raw.fell_back_from:
        logger.warning("%s.checkpoint: skipped %s (%s), using %s", field, skipped, why, raw.path)
    problems = []
    if raw.layer_l != lens.layer:
        message = (f"{lens.layer} does not match the checkpoint's layer_l {raw.layer_l} "
                   f"({raw.path})")  # fmt: skip
        problems.append(Problem("incompatible_lens", f"{field}.layer", message))
    if base_info is not None:
        problems += [Problem("incompatible_lens", f"{field}.checkpoint", p)
                     for p in check_compat(raw, base_info)]  # fmt: skip
    return problems


@dataclasses.dataclass(frozen=True)
class StartupReport:
    """What cannot serve at start-up, as clients see it (no server paths).

    `groups`: group id -> why its base cannot load (the group is not deployed).
    `lenses`: lens id -> (error code, why): its checkpoint, or the donor it reads, failed.
    `lines`: every problem as `lens-serve validate` prints it, for the log.
    """

    groups: dict[str, str]
    lenses: dict[str, tuple[str, str]]
    lines: list[str]


def startup_report(groups: list[GroupSpec]) -> StartupReport:
    """Check every group on disk and sort the failures by what they take down."""
    down_groups: dict[str, str] = {}
    down_lenses: dict[str, tuple[str, str]] = {}
    lines: list[str] = []
    for group in groups:
        found = find_problems(group)
        shown = str(group.source_file)
        lines += [problem.line(shown) for problem in found.all()]
        paths = group_paths(group)
        if found.base:
            down_groups[group.group_id] = redact_text(found.base[0].message, paths)
        for lens in group.lenses:
            problems = found.lenses.get(lens.lens_id, [])
            if not problems and lens.donor in found.donors:
                problems = found.donors[lens.donor]
            if problems:
                why = "; ".join(p.message for p in problems)
                down_lenses[lens.lens_id] = (problems[0].code, redact_text(why, paths))
    return StartupReport(down_groups, down_lenses, lines)
