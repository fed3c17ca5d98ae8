"""Reading `groups/*.yaml` into `GroupSpec`s: every problem of every file, one line each.

Between the YAML on disk and the models of `config.py`; `build_app` and `lens-serve
validate` both start here (STYLE §5: collect every problem, then raise once).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from deployments.config import GroupConfigError, GroupSpec, raw_id_problems

GROUP_FILE_SUFFIXES = (".yaml", ".yml")
# Our model validators start each line with a field path relative to the model they check.
_RELATIVE_FIELD = re.compile(r"^[A-Za-z_][\w.\[\]]*: ")


def _loc_text(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _format_validation_error(shown: str, exc: ValidationError) -> list[str]:
    """Turn pydantic's errors into `file: field: message` lines."""
    lines = []
    for err in exc.errors(include_url=False):
        prefix = _loc_text(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        for part in msg.splitlines():
            # Our model validators start each line with the field path relative to the model
            # they check; join it to where that model sits in the file.
            if err["type"] == "value_error" and _RELATIVE_FIELD.match(part):
                part_field, _, text = part.partition(": ")
                field = f"{prefix}.{part_field}" if prefix else part_field
                lines.append(f"{shown}: {field}: {text}")
            else:
                lines.append(f"{shown}: {prefix}: {part}" if prefix else f"{shown}: {part}")
    return lines


def _read_group_file(path: Path, shown: str) -> tuple[GroupSpec | None, list[str]]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        return None, [f"{shown}: cannot read: {exc}"]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = getattr(exc, "problem", None) or str(exc)
        return None, [f"{shown}: not valid YAML{where}: {why}"]
    if not isinstance(data, dict):
        return None, [f"{shown}: expected a mapping at the top level, got {type(data).__name__}"]
    if "source_file" in data:
        return None, [f"{shown}: source_file: Extra inputs are not permitted"]
    data["source_file"] = Path(os.path.abspath(path))
    try:
        group = GroupSpec.model_validate(data, context={"base_dir": data["source_file"].parent})
    except ValidationError as exc:
        problems = _format_validation_error(shown, exc)
        # Pydantic runs the after-validator only when every field parsed; report the id
        # problems anyway so one run shows all of them.
        if not any(e["loc"] == () for e in exc.errors()):
            problems += [f"{shown}: {line}" for line in raw_id_problems(data)]
        return None, problems
    return group, []


def _group_files(groups_dir: Path) -> list[Path]:
    return sorted(p for p in groups_dir.iterdir() if p.suffix in GROUP_FILE_SUFFIXES)


def load_groups(groups_dir: Path | str) -> list[GroupSpec]:
    """Read and validate every group file in `groups_dir` (the files, not what they name).

    `deployments/checks.py` reads the bases, donors and checkpoints they name.

    Args:
        groups_dir: directory holding `*.yaml` / `*.yml` group files.

    Returns:
        The groups, ordered by file name.

    Raises:
        GroupConfigError: listing every problem found, one `file: field: message` line each.

    """
    loaded, problems = read_groups(groups_dir)
    if problems:
        raise GroupConfigError(problems)
    return [group for group, _ in loaded]


def read_groups(groups_dir: Path | str) -> tuple[list[tuple[GroupSpec, str]], list[str]]:
    """Read every group file without raising: valid groups (with their file) and problems."""
    groups_dir = Path(groups_dir)
    if not groups_dir.is_dir():
        return [], [f"{groups_dir}: not a directory"]
    loaded: list[tuple[GroupSpec, str]] = []
    problems: list[str] = []
    files = _group_files(groups_dir)
    if not files:
        problems.append(f"{groups_dir}: no group files (*.yaml)")
    for path in files:
        group, errors = _read_group_file(path, str(path))
        problems += errors
        if group is not None:
            loaded.append((group, str(path)))
    return loaded, problems + _cross_group_problems(loaded)


def _cross_group_problems(loaded: list[tuple[GroupSpec, str]]) -> list[str]:
    """Group ids unique across files and lens ids unique across all groups."""
    problems = []
    group_owner: dict[str, str] = {}
    lens_owner: dict[str, str] = {}
    for group, shown in loaded:
        if group.group_id in group_owner:
            problems.append(
                f"{shown}: group_id: duplicate group id {group.group_id!r} "
                f"(also in {group_owner[group.group_id]})"
            )
        group_owner.setdefault(group.group_id, shown)
        for i, lens in enumerate(group.lenses):
            if lens.lens_id in lens_owner and lens_owner[lens.lens_id] != shown:
                problems.append(
                    f"{shown}: lenses[{i}].id: lens id {lens.lens_id!r} is already used in "
                    f"{lens_owner[lens.lens_id]}; lens ids must be unique across all groups"
                )
            lens_owner.setdefault(lens.lens_id, shown)
    return problems


def file_stamp(path: Path | None) -> tuple[int, int] | None:
    """(mtime in ns, size) of a group file, or None when it cannot be read: a change marker."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def reread_group(group: GroupSpec) -> tuple[GroupSpec | None, str]:
    """Read `group`'s file again for a live lens change; (new spec, "") or (None, why not).

    Only the lenses (and donors) may change live: a different group id, base model, dtype or
    replica block needs a redeploy, and such a file is refused (the running spec stays).
    """
    if group.source_file is None:
        return None, "the group has no file"
    new, problems = _read_group_file(group.source_file, str(group.source_file))
    if new is None:
        return None, "; ".join(problems)
    fixed = ("group_id", "base_model", "dtype", "replica")
    changed = [field for field in fixed if getattr(new, field) != getattr(group, field)]
    if changed:
        return None, f"{', '.join(changed)} changed: redeploy the application to apply it"
    return new, ""
