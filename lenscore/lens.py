"""A lens: its own small tensors plus references to the shared base and donor.

Loading a lens never copies the base: `Lens` keeps the trained tensors only
(LENS_FORMAT.md §Decoder/§Encoder state dict) and points at a `Base`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lenscore.base import Base
from lenscore.checkpoint import RawCheckpoint, read_checkpoint
from lenscore.compat import LensConfig, check_base_tensors, check_compat
from lenscore.errors import IncompatibleLens

log = logging.getLogger(__name__)

# Checkpoint key -> Lens tensor name. Encoder `proj` stays float32 (the trainer kept it so).
_DECODER_KEYS = {
    "proj_weight": "dec_proj_weight",  # [P, d, d]
    "proj_bias": "dec_proj_bias",  # [P, d]
    "proj.weight": "dec_proj_weight",  # [d, d]
    "proj.bias": "dec_proj_bias",  # [d]
    "prompt_left_emb": "prompt_left",  # [Lp, d]
    "prompt_right_emb": "prompt_right",  # [Rp, d]
}
_ENCODER_KEYS = {
    "proj.weight": "enc_proj_weight",  # [d, d]
    "proj.bias": "enc_proj_bias",  # [d]
    "soft_prompt_embeddings": "soft_prompt",  # [S, d]
    "soft_prompt_embeddings_postfix": "soft_postfix",  # [S2, d]
    "special_last_token_vector": "special_vector",  # [d]
}
_KEEP_FLOAT32 = {"enc_proj_weight", "enc_proj_bias"}


class Lens:
    """One lens attached to a shared base (and optionally a shared donor)."""

    def __init__(
        self,
        lens_id: str,
        checkpoint_path: Path,
        config: LensConfig,
        tensors: dict[str, torch.Tensor],
        base: Base,
        donor: Base | None = None,
        step: int | None = None,
    ) -> None:
        self.lens_id = lens_id
        self.checkpoint_path = checkpoint_path
        self.config = config
        self.tensors = tensors
        self.base = base
        self.donor = donor
        self.step = step
        self.load_seconds = 0.0

    @property
    def activation_model(self) -> Base:
        """The model whose activations the lens explains: the donor if any, else the base."""
        return self.donor if self.donor is not None else self.base

    @property
    def per_layer(self) -> bool:
        """Whether the decoder has one projection per slot ([P, d, d])."""
        return self.tensors["dec_proj_weight"].dim() == 3

    @property
    def nbytes(self) -> int:
        """Bytes of this lens's own tensors (never the base's)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        """Device of the lens tensors."""
        return self.tensors["prompt_left"].device

    def to(self, device: str | torch.device, *, stream: torch.cuda.Stream | None = None) -> Lens:
        """Move this lens's tensors (only those) to `device`; returns self.

        With a CUDA `stream` the copies run on it (so they overlap other requests' compute on
        the default stream) and are finished when this returns.
        """
        tensors, non_blocking = self.tensors, stream is not None  # on_stream waits for it
        self.tensors = on_stream(
            stream,
            lambda: {name: t.to(device, non_blocking=non_blocking) for name, t in tensors.items()},
        )
        return self

    def to_host(self, *, pinned: bool = False) -> Lens:
        """Move this lens's tensors to host memory, page-locked when `pinned` (CUDA only)."""
        if not pinned:
            return self.to("cpu")
        self.tensors = {name: _pinned_copy(t) for name, t in self.tensors.items()}
        return self

    def __repr__(self) -> str:
        return (
            f"Lens({self.lens_id!r}, layer={self.config.layer_l}, t_text={self.config.t_text}, "
            f"bytes={self.nbytes}, device={self.device})"
        )


def load_lens(
    checkpoint: str | Path,
    base: Base,
    *,
    donor: Base | None = None,
    lens_id: str | None = None,
    device: str | torch.device | None = None,
    raw: RawCheckpoint | None = None,
    stream: torch.cuda.Stream | None = None,
) -> Lens:
    """Read a checkpoint, check it against `base` (and `donor`), attach it.

    Args:
        checkpoint: run directory or file.
        base: the shared base the lens modules run on.
        donor: model whose activations are explained instead of the base's.
        lens_id: name used in results and errors (default: the run directory name).
        device: where the lens tensors go (default: the base's device).
        raw: an already read checkpoint (skips the file read).
        stream: a CUDA stream for the copies to the device (see `Lens.to`).

    Raises:
        CheckpointMissing, CheckpointCorrupt, CheckpointRefused: from `read_checkpoint`.
        IncompatibleLens: every problem with `base` / `donor`, in `detail["problems"]`.

    """
    started = time.perf_counter()
    raw = raw if raw is not None else read_checkpoint(checkpoint)
    lens_id = lens_id or Path(checkpoint).name
    problems = check_compat(raw, base.info)
    if donor is not None:
        problems += _check_donor(raw, base, donor)
    if any(key.startswith("base.") for key in list(raw.decoder) + list(raw.encoder)):
        problems += check_base_tensors(raw, base.model.state_dict())
    if problems:
        raise IncompatibleLens(f"lens {lens_id} ({raw.path})", problems)
    target = torch.device(device) if device is not None else base.device
    tensors = on_stream(stream, lambda: _collect_tensors(raw, base.dtype, target))
    lens = Lens(lens_id, raw.path, LensConfig.from_dict(raw.config), tensors, base, donor, raw.step)
    lens.load_seconds = time.perf_counter() - started
    log.info(
        "loaded lens %s from %s (%d bytes) in %.3fs",
        lens_id,
        raw.path,
        lens.nbytes,
        lens.load_seconds,
    )
    return lens


def _check_donor(raw: RawCheckpoint, base: Base, donor: Base) -> list[str]:
    b, d = base.info, donor.info
    problems = []
    if d.d != b.d:
        problems.append(f"donor {donor.path} has hidden size {d.d}, base has {b.d}")
    if not 0 <= raw.layer_l < d.n_layers:
        problems.append(f"layer_l {raw.layer_l} is out of range for donor with {d.n_layers} layers")
    if d.vocab_size != b.vocab_size or len(d.tokenizer) != len(b.tokenizer):
        problems.append(f"donor {donor.path} has another vocabulary than the base")
    return problems


def _collect_tensors(
    raw: RawCheckpoint, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for state, names in ((raw.decoder, _DECODER_KEYS), (raw.encoder, _ENCODER_KEYS)):
        for key, name in names.items():
            if key not in state:
                continue
            want = torch.float32 if name in _KEEP_FLOAT32 else dtype
            # A memory-mapped file's tensors are copied: the lens must not depend on the file
            # afterwards. Owned ones (lenscore/packed.py) are converted or moved only if needed.
            tensors[name] = state[key].to(device=device, dtype=want, copy=not raw.owned)
    return tensors


def on_stream(
    stream: torch.cuda.Stream | None, make: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Run `make` (tensor copies) on a CUDA side stream and wait for it; None: as is."""
    if stream is None:
        return make()
    with torch.cuda.stream(stream):
        tensors = make()
    stream.synchronize()
    for tensor in tensors.values():
        if tensor.device.type == "cuda":
            # Used on the default stream from now on: the allocator must not hand the block
            # back to the copy stream while work queued on the default stream may read it.
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
    return tensors


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu" and tensor.is_pinned():
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return out.copy_(tensor)
