"""Encoder: explanation ids -> reconstructed activation Â (LENS_FORMAT.md §Encoding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lenscore.lens import Lens


def encoder_embeds(
    lens: Lens, explanation_ids: torch.Tensor, current_ids: torch.Tensor | None
) -> torch.Tensor:
    """Layer-0 input `s · [soft ; explanation ; postfix ; current token + special]`.

    Args:
        explanation_ids: [B, t] int64.
        current_ids: [B] int64, the analysed token per row (used with `add_current_token`).

    Returns:
        [B, S + t + S2 (+1), d] in the base's dtype.

    """
    base, tensors, cfg = lens.base, lens.tensors, lens.config
    scale = base.embed_scale
    batch = explanation_ids.shape[0]
    parts = [tensors["soft_prompt"].to(base.dtype).expand(batch, -1, -1) * scale]
    parts.append(base.embed_ids(explanation_ids))
    if "soft_postfix" in tensors:
        parts.append(tensors["soft_postfix"].to(base.dtype).expand(batch, -1, -1) * scale)
    if cfg.add_current_token:
        if current_ids is None:
            raise ValueError("this lens adds the current token: pass current_ids")
        parts.append(base.embed_ids(current_ids[:, None]))
    embeds = torch.cat(parts, dim=1)
    if "special_vector" in tensors:
        embeds[:, -1] = embeds[:, -1] + tensors["special_vector"].to(base.dtype) * scale
    return embeds


@torch.no_grad()
def encode(
    lens: Lens, explanation_ids: torch.Tensor, current_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Reconstruct activations from explanations, [B, d] float32."""
    base = lens.base
    embeds = encoder_embeds(lens, explanation_ids, current_ids)
    layer = lens.config.encoder_layer(len(base.layers))
    if layer == -2:
        hidden = embeds[:, -1]  # the input of block 0
    else:
        hidden = base.capture(embeds, layer)[:, -1]  # [B, d]
    hidden = hidden.float()
    if not lens.config.use_projection_layer:
        return hidden
    weight = lens.tensors["enc_proj_weight"]
    return F.linear(hidden.to(weight.device), weight, lens.tensors["enc_proj_bias"])
