"""Packed lens files: a trainer checkpoint's lens tensors as safetensors, its config as JSON.

Beside `checkpoint.py` on the data path (DESIGN §Serving shape, "Packed lens files"). The
trainer checkpoint stays the source of truth: a packed file is named by a key of the source
file's resolved path, size, modification time and `PACK_FORMAT_VERSION`, so a changed source
simply has no packed file until `lens-serve pack` writes one again. Packed files are read
without pickle: memory-mapped, each tensor copied into memory the process owns (pinned on a
GPU host); any failure to read one falls back to the trainer file with a log line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lenscore.checkpoint import RawCheckpoint, list_checkpoints, read_checkpoint
from lenscore.errors import CheckpointCorrupt, CheckpointRefused

log = logging.getLogger(__name__)

PACK_FORMAT_VERSION = 1
KEY_FIELD = "lens_serve_pack_key"  # safetensors metadata: ties the tensors to their JSON
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# What a damaged or foreign packed file can raise while being read.
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError)


@dataclass(frozen=True)
class PackedFile:
    """One packed lens: its tensors file, its JSON, the source it came from."""

    key: str
    tensors_path: Path
    config_path: Path
    source: Path
    tensor_bytes: int
    written: bool  # False: a fresh packed file was already there


def source_file(checkpoint: str | Path) -> Path | None:
    """Return the trainer file a checkpoint path means (a run dir's best), or None."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if path.is_dir():
        candidates = list_checkpoints(path)
        return candidates[0] if candidates else None
    return None


def pack_key(source: Path) -> str:
    """Key of a source file's identity: resolved path, size, mtime (ns), pack format.

    Raises:
        OSError: the file cannot be stat'ed.

    """
    stat = source.stat()
    identity = {
        "path": str(source.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "format": PACK_FORMAT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return digest[:32]


def packed_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """(tensors file, JSON file) of a key in a cache directory."""
    return cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json"


def pack_checkpoint(
    checkpoint: str | Path, cache_dir: str | Path, *, force: bool = False
) -> PackedFile:
    """Write a checkpoint's lens tensors and config into `cache_dir` (skip if fresh).

    Stale packed files of the same source file are removed.

    Raises:
        CheckpointMissing, CheckpointCorrupt, CheckpointRefused: from `read_checkpoint`, or
            the source changed during every try, or its config is not plain JSON.

    """
    from safetensors.torch import save_file

    cache_dir = Path(cache_dir)
    for _ in range(3):
        raw = read_checkpoint(checkpoint)
        key = pack_key(raw.path)
        tensors_path, config_path = packed_paths(cache_dir, key)
        if not force and _is_fresh(tensors_path, config_path, key):
            return PackedFile(key, tensors_path, config_path, raw.path, raw.tensor_bytes, False)
        tensors = {
            f"{part}.{name}": t.detach().contiguous().clone()  # own memory, none shared
            for part, state in (("decoder", raw.decoder), ("encoder", raw.encoder))
            for name, t in state.items()
        }
        if pack_key(raw.path) == key:  # the source did not change while it was read
            break
    else:
        raise CheckpointCorrupt(raw.path, "the file kept changing while it was packed")
    record = _record(raw, key)
    try:
        json.dumps(record)  # checked before anything is written
    except (TypeError, ValueError) as exc:
        raise CheckpointRefused(
            f"checkpoint {raw.path}: its config is not plain JSON and cannot be packed ({exc})",
            {"path": str(raw.path)},
        ) from exc
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Tensors first, JSON last: a reader finds the JSON only once both files are complete.
    tmp = f".tmp-{os.getpid()}"
    save_file(tensors, str(tensors_path) + tmp, metadata={KEY_FIELD: key})
    os.replace(str(tensors_path) + tmp, tensors_path)
    record["tensors_file_bytes"] = tensors_path.stat().st_size
    Path(str(config_path) + tmp).write_text(json.dumps(record, indent=1) + "\n")
    os.replace(str(config_path) + tmp, config_path)
    _remove_stale(cache_dir, record["source"]["path"], keep=key)
    return PackedFile(key, tensors_path, config_path, raw.path, raw.tensor_bytes, True)


def _record(raw: RawCheckpoint, key: str) -> dict[str, Any]:
    stat = raw.path.stat()
    return {
        "format": PACK_FORMAT_VERSION,
        "key": key,
        "source": {
            "path": str(raw.path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        },
        "step": raw.step,
        "epoch": raw.epoch,
        "tensor_bytes": raw.tensor_bytes,
        "config": raw.config,
    }


def _is_fresh(tensors_path: Path, config_path: Path, key: str) -> bool:
    try:
        record = json.loads(config_path.read_text())
        return (
            record.get("key") == key
            and record.get("format") == PACK_FORMAT_VERSION
            and tensors_path.stat().st_size == record.get("tensors_file_bytes")
        )
    except (OSError, ValueError):
        return False


def _remove_stale(cache_dir: Path, source_path: str, *, keep: str) -> None:
    for config_path in cache_dir.glob("*.json"):
        if config_path.stem == keep:
            continue
        try:
            record = json.loads(config_path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and (record.get("source") or {}).get("path") == source_path:
            tensors_path, _ = packed_paths(cache_dir, config_path.stem)
            config_path.unlink(missing_ok=True)  # JSON first: readers stop finding it
            tensors_path.unlink(missing_ok=True)
            log.info("removed stale packed file %s of %s", tensors_path.name, source_path)


def read_packed(
    checkpoint: str | Path, cache_dir: str | Path, *, pinned: bool = False
) -> RawCheckpoint | None:
    """Read the fresh packed file of a checkpoint, or None (none, stale, or unreadable).

    Args:
        checkpoint: run directory or file, as for `read_checkpoint`.
        cache_dir: where `pack_checkpoint` wrote it.
        pinned: allocate the tensors in pinned host memory (faster copies to a GPU).

    """
    source = source_file(checkpoint)
    if source is None:
        return None
    try:
        key = pack_key(source)
    except OSError:
        return None
    tensors_path, config_path = packed_paths(Path(cache_dir), key)
    if not config_path.is_file():
        return None  # not packed, or packed before the source last changed
    try:
        record = json.loads(config_path.read_text())
        if record.get("key") != key or record.get("format") != PACK_FORMAT_VERSION:
            raise ValueError("its JSON belongs to another source or pack format")
        tensors, meta = read_tensors(tensors_path, pinned=pinned)
        if meta.get(KEY_FIELD) != key:
            raise ValueError("its tensors belong to another packed file")
        return _raw_from(source, record, tensors, tensors_path)
    except _READ_ERRORS as exc:
        log.warning(
            "packed file %s cannot be read (%s: %s); reading the trainer checkpoint %s",
            tensors_path.name, type(exc).__name__, exc, source.name,
        )  # fmt: skip
        return None


def _raw_from(
    source: Path, record: dict[str, Any], tensors: dict[str, torch.Tensor], packed: Path
) -> RawCheckpoint:
    parts: dict[str, dict[str, torch.Tensor]] = {"decoder": {}, "encoder": {}}
    for name, tensor in tensors.items():
        part, _, key = name.partition(".")
        parts[part][key] = tensor  # KeyError for a foreign part: unreadable
    config = record["config"]
    for key in ("layer_l", "t_text"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"config.{key} is missing or not an integer")
    return RawCheckpoint(
        path=source,
        config=config,
        decoder=parts["decoder"],
        encoder=parts["encoder"],
        step=record.get("step"),
        epoch=record.get("epoch"),
        file_bytes=record["source"]["size"],
        owned=True,
        packed=packed,
    )


def read_tensors(path: Path, *, pinned: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Copy every tensor of a safetensors file out of a mapping into new memory.

    The copies are torch copies (several threads for a large tensor), into pinned memory when
    `pinned`. NOTE: unlike a trainer file, a packed file is never rewritten in place
    (`pack_checkpoint` renames a new file over it), so the mapping cannot lose its pages
    (SIGBUS) while it is read.

    Returns:
        (name -> tensor, the header's `__metadata__`).

    Raises:
        OSError, ValueError, KeyError, EOFError: unreadable, truncated or malformed file.

    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(_read_exact(f, 8), "little")
        if not 0 < n <= min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        header = json.loads(_read_exact(f, n))
        meta = header.pop("__metadata__", None) or {}
        # ACCESS_COPY (a private mapping): writable for torch.frombuffer, never written back.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            tensors = _copy_out(mapped, header, 8 + n, size, pinned)
    return tensors, meta


def _copy_out(
    mapped: mmap.mmap, header: dict[str, Any], start_of_data: int, size: int, pinned: bool
) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]], pin_memory=pinned)
        nbytes = tensor.numel() * tensor.element_size()
        if end - begin != nbytes or start_of_data + end > size:
            raise ValueError(f"tensor {name}: offsets {begin}..{end} do not match its shape")
        if nbytes:
            offset = start_of_data + begin
            # Typed copies where aligned (safetensors aligns them): faster than byte copies.
            flat = tensor.reshape(-1)
            if offset % tensor.element_size():
                flat = flat.view(torch.uint8)
            source = torch.frombuffer(mapped, dtype=flat.dtype, count=flat.numel(), offset=offset)
            flat.copy_(source)
            del source  # the mapping closes only once no view of it is left
        tensors[name] = tensor
    return tensors


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"file ends after {len(data)} of {n} bytes")
    return data


def own_tensors(raw: RawCheckpoint, *, pinned: bool = False) -> RawCheckpoint:
    """Copy a checkpoint's lens tensors off its file mapping (DESIGN §Disk reads)."""
    if raw.owned:
        return raw

    def copy(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
        return out.copy_(t)

    return dataclasses.replace(
        raw,
        decoder={k: copy(t) for k, t in raw.decoder.items()},
        encoder={k: copy(t) for k, t in raw.encoder.items()},
        owned=True,
    )


def read_for_serving(
    checkpoint: str | Path, *, packed_dir: str | Path | None = None, pinned: bool = False
) -> RawCheckpoint:
    """Read a lens for loading: its fresh packed file if any, else the trainer checkpoint.

    Either way the tensors end up in memory the process owns (`owned`), so the load that
    follows need not copy them again on the host.

    Raises:
        CheckpointMissing, CheckpointCorrupt, CheckpointRefused: from `read_checkpoint`.

    """
    if packed_dir is not None:
        raw = read_packed(checkpoint, packed_dir, pinned=pinned)
        if raw is not None:
            return raw
    return own_tensors(read_checkpoint(checkpoint), pinned=pinned)
