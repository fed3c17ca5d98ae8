"""Encoder: explanation ids -> reconstructed activation Â (LENS_FORMAT.md §Encoding).

The soft prompt before the explanation is the same for every row of a lens: it runs once
per call and every row continues it through the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lenscore.lens import Lens


def _tail_embeds(
    lens: Lens, explanation_ids: torch.Tensor, current_ids: torch.Tensor | None
) -> torch.Tensor:
    """Layer-0 input after the soft prompt: `s · [explanation ; postfix ; current + special]`."""
    base, tensors, cfg = lens.base, lens.tensors, lens.config
    scale = base.embed_scale
    batch = explanation_ids.shape[0]
    parts = [base.embed_ids(explanation_ids)]
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


def _soft_embeds(lens: Lens) -> torch.Tensor:
    """Scale the soft prompt like embedded tokens, [S, d]."""
    return lens.tensors["soft_prompt"].to(lens.base.dtype) * lens.base.embed_scale


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
    tail = _tail_embeds(lens, explanation_ids, current_ids)
    soft = _soft_embeds(lens).expand(tail.shape[0], -1, -1)
    return torch.cat([soft, tail], dim=1)


@torch.no_grad()
def encode(
    lens: Lens,
    explanation_ids: torch.Tensor,
    current_ids: torch.Tensor | None = None,
    *,
    shared: bool = True,
) -> torch.Tensor:
    """Reconstruct activations from explanations, [B, d] float32.

    `shared=False` runs every row's whole input (the reference path of tests and bench).
    """
    base = lens.base
    layer = lens.config.encoder_layer(len(base.layers))
    soft = _soft_embeds(lens)  # [S, d]
    if layer == -2:
        hidden = _tail_embeds(lens, explanation_ids, current_ids)[:, -1]  # input of block 0
    elif shared and soft.shape[0] > 0:
        tail = _tail_embeds(lens, explanation_ids, current_ids)  # [B, t + S2 (+1), d]
        cache = base.cache_prefix(soft, tail.shape[0])
        hidden = base.capture(tail, layer, cache=cache)[:, -1]  # [B, d]
    else:
        embeds = encoder_embeds(lens, explanation_ids, current_ids)
        hidden = base.capture(embeds, layer)[:, -1]  # [B, d]
    hidden = hidden.float()
    if not lens.config.use_projection_layer:
        return hidden
    weight = lens.tensors["enc_proj_weight"]
    return F.linear(hidden.to(weight.device), weight, lens.tensors["enc_proj_bias"])
