"""Read trainer checkpoints safely: the first step of the data path below a group replica.

LENS_FORMAT.md §The checkpoint file is the contract: highest step wins, no pickled code runs,
RNG state is never restored, `_orig_mod.` prefixes are stripped, corrupt files fall back to
an older intact file in the same run directory.
"""

from __future__ import annotations

import logging
import pickle
import re
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenscore.errors import CheckpointCorrupt, CheckpointMissing, CheckpointRefused

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint_step(\d+)_epoch(\d+)_.*\.pt$")
_COMPILE_PREFIX = "_orig_mod."
# NOTE: torch's `safe_globals` context edits one process-wide allow-list: a thread leaving it
# removes the entries while another thread is still unpickling, which then reads a good file
# as refused or corrupt. Unpickling a memory-mapped file reads no tensor data, so holding this
# lock is brief; the copies off the mapping run in parallel (lenscore/packed.py).
_UNPICKLE_LOCK = threading.Lock()


def _allowed_globals() -> list[Any]:
    # Exactly what real trainer files need (LENS_FORMAT.md): the numpy RNG key array.
    allowed: list[Any] = [np.ndarray, np.dtype, np.dtypes.UInt32DType]
    reconstruct = np._core.multiarray._reconstruct  # type: ignore[attr-defined]
    allowed.append(reconstruct)
    # Files written under numpy 1.x name the same function by its old module path.
    allowed.append((reconstruct, "numpy.core.multiarray._reconstruct"))
    return allowed


@dataclass
class RawCheckpoint:
    """The parts of one checkpoint file that a lens needs, tensors still on CPU."""

    path: Path
    config: dict[str, Any]
    decoder: dict[str, torch.Tensor]
    encoder: dict[str, torch.Tensor]
    step: int | None
    epoch: int | None
    file_bytes: int
    fell_back_from: list[tuple[Path, str]] = field(default_factory=list)
    # True once the tensors are the process's own memory, not views of a file mapping, so a
    # load need not copy them again (lenscore/packed.py).
    owned: bool = False
    packed: Path | None = None  # the packed file read instead of `path`, if any

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the lens tensors (decoder + encoder), not of the whole file."""
        tensors = list(self.decoder.values()) + list(self.encoder.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def layer_l(self) -> int:
        """The base layer whose output the lens explains."""
        return int(self.config["layer_l"])

    @property
    def t_text(self) -> int:
        """Explanation length in tokens."""
        return int(self.config["t_text"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run directory, best first: highest step, then newest file."""
    found = []
    for path in run_dir.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path.stat().st_mtime, path))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [path for _, _, path in found]


def read_checkpoint(path: str | Path, *, mmap: bool = True) -> RawCheckpoint:
    """Read a run directory's best intact checkpoint, or one named file.

    Args:
        path: a run directory (highest `checkpoint_step*` wins) or one `.pt` file.
        mmap: map the file instead of reading it, so optimizer state is never touched.

    Raises:
        CheckpointMissing: no such file, or a directory without checkpoint files.
        CheckpointCorrupt: the file (or, for a directory, every file) is unreadable.
        CheckpointRefused: the file needs pickled globals outside the allow-list.

    """
    path = Path(path)
    if path.is_file():
        return _read_file(path, mmap=mmap)
    if not path.is_dir():
        raise CheckpointMissing(f"no checkpoint at {path}: no such file or directory")
    candidates = list_checkpoints(path)
    if not candidates:
        raise CheckpointMissing(f"no checkpoint_step*_epoch*_*.pt file in run directory {path}")
    skipped: list[tuple[Path, str]] = []
    for candidate in candidates:
        try:
            raw = _read_file(candidate, mmap=mmap)
        except CheckpointCorrupt as exc:
            skipped.append((candidate, exc.detail["why"]))
            continue
        if skipped:
            log.warning(
                "skipped corrupt checkpoint(s) %s; using older %s",
                ", ".join(f"{p.name} ({why})" for p, why in skipped),
                candidate.name,
            )
        raw.fell_back_from = skipped
        return raw
    newest, why = skipped[0]
    raise CheckpointCorrupt(newest, f"{why} (and no older intact checkpoint in {path})")


def _read_file(path: Path, *, mmap: bool) -> RawCheckpoint:
    try:
        with _UNPICKLE_LOCK, torch.serialization.safe_globals(_allowed_globals()):
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if refused:
            raise CheckpointRefused(
                f"checkpoint {path} needs pickled global {refused.group(1)}, which lens-serve "
                "does not load (only numpy arrays and tensors are allowed)",
                {"path": str(path), "global": refused.group(1)},
            ) from exc
        raise CheckpointCorrupt(path, _first_line(exc)) from exc
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise CheckpointMissing(f"no checkpoint at {path}") from exc
        raise CheckpointCorrupt(path, _first_line(exc)) from exc
    return _unpack(path, blob)


def _unpack(path: Path, blob: Any) -> RawCheckpoint:
    if not isinstance(blob, dict):
        raise CheckpointCorrupt(path, f"top level is {type(blob).__name__}, not a dict")
    missing = [key for key in ("models", "config") if key not in blob]
    if missing:
        raise CheckpointCorrupt(path, f"missing required key(s) {', '.join(missing)}")
    models = blob["models"]
    if not isinstance(models, dict) or "decoder" not in models or "encoder" not in models:
        raise CheckpointCorrupt(path, "`models` must hold `decoder` and `encoder` state dicts")
    config = blob["config"]
    if not isinstance(config, dict):
        raise CheckpointCorrupt(path, "`config` is not a dict")
    for key in ("layer_l", "t_text"):
        if not isinstance(config.get(key), int):
            raise CheckpointCorrupt(path, f"config.{key} is missing or not an integer")
    return RawCheckpoint(
        path=path,
        config=config,
        decoder=_strip_prefix(models["decoder"]),
        encoder=_strip_prefix(models["encoder"]),
        step=_as_int(blob.get("step")),
        epoch=_as_int(blob.get("epoch")),
        file_bytes=path.stat().st_size,
    )


def _strip_prefix(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key.replace(_COMPILE_PREFIX, "")] = value
    return out


def _as_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
