"""Server paths out of what clients see: responses name files, never where they live.

Used by the replica (error messages and analysis meta) and the ingress (start-up problems):
a message about `/srv/models/ckpts/run7/checkpoint_step9_epoch1_.pt` reads `run7/...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deployments.config import GroupSpec


def group_paths(group: GroupSpec) -> list[Path]:
    """Every path the group file names, and the directories holding them."""
    paths = [
        group.base_model,
        *(d.path for d in group.donors),
        *(x.checkpoint for x in group.lenses),
    ]
    if group.source_file is not None:
        paths.append(group.source_file)
    return paths


def redact_text(text: str, paths: list[Path]) -> str:
    """Replace each known path (and its directory) in `text` by the last part of its name."""
    prefixes: dict[str, str] = {}
    for path in paths:
        if path.is_absolute():
            prefixes[str(path)] = path.name
            prefixes[str(path.parent) + "/"] = ""
    for prefix in sorted(prefixes, key=len, reverse=True):
        text = text.replace(prefix, prefixes[prefix])
    return text


def redact(value: Any, paths: list[Path]) -> Any:
    """Redact every string inside a JSON-like value (dicts, lists, strings, paths)."""
    if isinstance(value, str):
        return redact_text(value, paths)
    if isinstance(value, Path):
        return redact_text(str(value), paths)
    if isinstance(value, dict):
        return {key: redact(item, paths) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item, paths) for item in value]
    return value
