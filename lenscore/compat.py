"""Lens configuration and its compatibility with a base (LENS_FORMAT.md §Compatibility).

`LensConfig` is the typed view of the trainer's config dict (unknown keys ignored);
`check_compat` lists every reason a checkpoint cannot run on a base, one sentence each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lenscore.base import BaseInfo
from lenscore.checkpoint import RawCheckpoint

JUST_INPUT = "just_input"


@dataclass(frozen=True)
class LensConfig:
    """The config fields that change what a lens computes."""

    layer_l: int
    t_text: int
    model_dtype: str
    decoder_prompt: str
    patch_all_layers: bool | int | str
    per_layer_projections: bool
    new_decoder: bool
    decoder_base_model: bool
    output_head: bool
    output_layer: int
    soft_prompt_text: str | None
    add_current_token: bool
    special_last_token_vector: bool
    use_projection_layer: bool
    model_name: str | None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LensConfig:
        """Build from the trainer's nested config dict; extra keys are ignored."""
        parts = config.get("trainable_components") or {}
        dec = parts.get("decoder") or {}
        enc = parts.get("encoder") or {}
        patch = dec.get("patch_all_layers", False)
        if not isinstance(patch, bool | int) and patch != JUST_INPUT:
            raise ValueError(
                f"decoder.patch_all_layers must be true, false, an integer or "
                f"{JUST_INPUT!r}, not {patch!r}"
            )
        return cls(
            layer_l=int(config["layer_l"]),
            t_text=int(config["t_text"]),
            model_dtype=str(config.get("model_dtype", "float32")),
            decoder_prompt=str(config.get("decoder_prompt") or ""),
            patch_all_layers=patch,
            per_layer_projections=bool(dec.get("per_layer_projections", False)),
            new_decoder=bool(dec.get("new_decoder", False)),
            decoder_base_model=bool(dec.get("base_model", False)),
            output_head=bool(dec.get("output_head", False)),
            output_layer=int(enc.get("output_layer", config["layer_l"])),
            soft_prompt_text=enc.get("soft_prompt_init_text") or config.get("encoder_prompt"),
            add_current_token=bool(enc.get("add_current_token", False)),
            special_last_token_vector=bool(enc.get("special_last_token_vector", False)),
            use_projection_layer=bool(enc.get("use_projection_layer", True)),
            model_name=config.get("model_name"),
        )

    def patched_layers(self, n_layers: int) -> int:
        """How many decoder layers (from layer 0) get the activation slot overwritten."""
        patch = self.patch_all_layers
        if patch is True:
            return n_layers
        if patch is False or patch == JUST_INPUT:
            return 0
        return int(patch)

    def projection_count(self, n_layers: int) -> int:
        """P implied by the config: rows of `proj_weight` (LENS_FORMAT.md §Compatibility)."""
        count = self.patched_layers(n_layers)
        return count + 1 if self.new_decoder else count

    def projection_index(self, layer: int) -> int:
        """Projection row used at decoder layer `layer`; the input slot uses row 0."""
        return layer + 1 if self.new_decoder else layer

    def encoder_layer(self, n_layers: int) -> int:
        """Block whose output the encoder reads; -2 means the input of block 0."""
        k = self.output_layer
        if k >= 0 or k == -2:
            return k
        return n_layers + k


def split_prompt(text: str | None, marker: str) -> tuple[str, str] | None:
    """Split a prompt at its one marker; None when there is no such text."""
    if not text or marker not in text:
        return None
    left, right = text.split(marker, 1)
    return left, right


def count_tokens(tokenizer: Any, text: str) -> int:
    """Token count of `text` without special tokens added."""
    if not text:
        return 0
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_compat(raw: RawCheckpoint, base: BaseInfo) -> list[str]:
    """Every reason `raw` cannot run on `base`, one sentence each ([] = compatible)."""
    try:
        cfg = LensConfig.from_dict(raw.config)
    except (KeyError, TypeError, ValueError) as exc:
        return [f"config cannot be read: {exc}"]
    problems: list[str] = []
    problems += _check_config(cfg, base)
    problems += _check_shapes(raw, cfg, base)
    problems += _check_prompts(raw, cfg, base)
    return problems


def _check_config(cfg: LensConfig, base: BaseInfo) -> list[str]:
    n = base.n_layers
    problems = []
    if not 0 <= cfg.layer_l < n:
        problems.append(f"layer_l {cfg.layer_l} is out of range for a base with {n} layers")
    k = cfg.encoder_layer(n)
    if k != -2 and not 0 <= k < n:
        problems.append(
            f"encoder output_layer {cfg.output_layer} is out of range for a base with {n} layers"
        )
    if cfg.t_text < 1:
        problems.append(f"t_text {cfg.t_text} must be at least 1")
    if cfg.decoder_base_model:
        problems.append("decoder trained the base model (base_model: true): it cannot share it")
    if cfg.output_head:
        problems.append("decoder trained its own output head (output_head: true): unsupported")
    if cfg.new_decoder and cfg.patch_all_layers is True:
        problems.append("new_decoder with patch_all_layers: true is unsupported")
    elif cfg.projection_count(n) == 0:
        problems.append(
            f"patch_all_layers {cfg.patch_all_layers!r} without new_decoder implies no "
            "projection at all: unsupported"
        )
    patched = cfg.patched_layers(n)
    if patched > n:
        problems.append(f"patch_all_layers {patched} exceeds the base's {n} layers")
    return problems


def _check_shapes(raw: RawCheckpoint, cfg: LensConfig, base: BaseInfo) -> list[str]:
    d, n = base.d, base.n_layers
    problems = []
    for part, state in (("decoder", raw.decoder), ("encoder", raw.encoder)):
        for key, tensor in state.items():
            if key == "prompt_ids" or key.startswith("base.") or tensor.dim() == 0:
                continue
            if tensor.shape[-1] != d:
                problems.append(
                    f"{part} tensor {key} has hidden size {tensor.shape[-1]}, base has {d}"
                )
    return problems + _check_required(raw, cfg, n)


def _check_required(raw: RawCheckpoint, cfg: LensConfig, n: int) -> list[str]:
    problems = []
    dec = raw.decoder
    if "proj_weight" in dec:
        rows = dec["proj_weight"].shape[0]
        want = cfg.projection_count(n)
        if want > 0 and rows != want:
            problems.append(
                f"decoder has {rows} per-layer projections but the config implies {want} "
                f"(patch_all_layers {cfg.patch_all_layers!r}, new_decoder {cfg.new_decoder}, "
                f"{n} base layers)"
            )
    elif "proj.weight" not in dec:
        problems.append("decoder has neither proj_weight nor proj.weight")
    for key in ("prompt_left_emb", "prompt_right_emb"):
        if key not in dec:
            problems.append(f"decoder lacks {key}")
    if "soft_prompt_embeddings" not in raw.encoder:
        problems.append("encoder lacks soft_prompt_embeddings")
    if cfg.use_projection_layer and "proj.weight" not in raw.encoder:
        problems.append("encoder uses a projection layer but lacks proj.weight")
    return problems


def _check_prompts(raw: RawCheckpoint, cfg: LensConfig, base: BaseInfo) -> list[str]:
    dec, enc, tok = raw.decoder, raw.encoder, base.tokenizer
    problems = []
    left = dec.get("prompt_left_emb")
    right = dec.get("prompt_right_emb")
    ids = dec.get("prompt_ids")
    if left is None or right is None:
        return problems
    lp, rp = left.shape[0], right.shape[0]
    if ids is not None and ids.numel() != lp + 1 + rp:
        problems.append(
            f"prompt_ids has {ids.numel()} ids but the prompt embeddings imply {lp} + 1 + {rp}"
        )
    if ids is not None and ids.numel() and int(ids.max()) >= len(tok):
        problems.append(
            f"prompt_ids use token id {int(ids.max())}, beyond the base tokenizer's "
            f"{len(tok)} tokens"
        )
    pieces = split_prompt(cfg.decoder_prompt, "<embed>")
    if pieces is not None:
        want = (count_tokens(tok, pieces[0]), count_tokens(tok, pieces[1]))
        if want != (lp, rp):
            problems.append(
                f"decoder prompt tokenizes to {want[0]} + {want[1]} tokens with this base's "
                f"tokenizer, the checkpoint has {lp} + {rp} prompt embeddings"
            )
    problems += _check_soft_prompt(enc, cfg, tok)
    return problems


def _check_soft_prompt(enc: dict[str, torch.Tensor], cfg: LensConfig, tok: Any) -> list[str]:
    pieces = split_prompt(cfg.soft_prompt_text, "<text>")
    soft = enc.get("soft_prompt_embeddings")
    if pieces is None or soft is None:
        return []
    post = enc.get("soft_prompt_embeddings_postfix")
    have = (soft.shape[0], 0 if post is None else post.shape[0])
    want = (count_tokens(tok, pieces[0]), count_tokens(tok, pieces[1]))
    if have != want:
        return [
            f"encoder soft prompt tokenizes to {want[0]} + {want[1]} tokens with this base's "
            f"tokenizer, the checkpoint has {have[0]} + {have[1]} soft prompt embeddings"
        ]
    return []


def check_base_tensors(raw: RawCheckpoint, base_state: dict[str, torch.Tensor]) -> list[str]:
    """Problems with `base.*` tensors a checkpoint carries that differ from the shared base."""
    problems = []
    for part, state in (("decoder", raw.decoder), ("encoder", raw.encoder)):
        for key, tensor in state.items():
            if not key.startswith("base."):
                continue
            name = key[len("base.") :]
            shared = base_state.get(name)
            same = (
                shared is not None
                and shared.shape == tensor.shape
                and torch.equal(shared.detach().cpu().to(tensor.dtype), tensor)
            )
            if not same:
                problems.append(
                    f"{part} carries base weight {name} that differs from the shared base: "
                    "this lens needs its own base"
                )
    return problems
