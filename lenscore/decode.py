"""Decoder: activation -> explanation token ids (LENS_FORMAT.md §Decoding).

The lens's soft prompt and projected activation go through the shared base with the KV cache;
per-layer patching is a forward pre-hook on the base's decoder layers, never a re-implemented
forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lenscore.lens import Lens


def project(lens: Lens, acts: torch.Tensor) -> torch.Tensor:
    """Projected activations for every slot, [P, B, d] (P = 1 for a single projection)."""
    weight = lens.tensors["dec_proj_weight"]
    bias = lens.tensors["dec_proj_bias"]
    acts = acts.to(device=weight.device, dtype=weight.dtype)
    if weight.dim() == 2:
        return F.linear(acts, weight, bias)[None]
    return torch.stack([F.linear(acts, weight[p], bias[p]) for p in range(weight.shape[0])])


def prompt_embeds(lens: Lens, slot: torch.Tensor) -> torch.Tensor:
    """Layer-0 input `s · [prompt_left ; x_0 ; prompt_right]`, [B, Lp+1+Rp, d]."""
    base = lens.base
    left = lens.tensors["prompt_left"]  # [Lp, d]
    right = lens.tensors["prompt_right"]  # [Rp, d]
    batch = slot.shape[0]
    rows = torch.cat(
        [
            left.expand(batch, -1, -1),
            slot[:, None].to(left.dtype),
            right.expand(batch, -1, -1),
        ],
        dim=1,
    )
    return rows.to(base.dtype) * base.embed_scale


def _patch_plan(lens: Lens, slots: torch.Tensor) -> dict[int, Callable]:
    """Pre-hooks that overwrite the activation slot entering each patched layer, unscaled."""
    cfg = lens.config
    embed_pos = lens.tensors["prompt_left"].shape[0]
    n_patch = cfg.patched_layers(len(lens.base.layers))

    def make(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        row = cfg.projection_index(layer) if lens.per_layer else 0
        value = slots[row]  # [B, d]

        def patch(hidden: torch.Tensor) -> torch.Tensor:
            if hidden.shape[1] <= embed_pos:
                return hidden  # a cached generation step, not the prompt pass
            hidden = hidden.clone()
            hidden[:, embed_pos] = value.to(hidden.dtype)
            return hidden

        return patch

    return {layer: make(layer) for layer in range(n_patch)}


def choose_tokens(
    logits: torch.Tensor, temperature: float, generators: Sequence[torch.Generator] | None
) -> torch.Tensor:
    """Pick one token per row: argmax at temperature 0, else a per-row seeded draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not torch.isfinite(probs).all():
        # A temperature so small that logits / T overflows: its limit is the argmax.
        return logits.argmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1)[:, 0]
    # One generator per row, so a row's draw does not depend on what else is in the batch.
    picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(picks)


@torch.no_grad()
def decode(
    lens: Lens,
    acts: torch.Tensor,
    *,
    temperature: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Generate exactly `t_text` explanation ids per activation.

    Args:
        acts: activations at the lens's layer, [B, d].
        temperature: 0 = argmax.
        generators: one per row for seeded sampling.

    Returns:
        Token ids, [B, t_text] int64 on the base's device.

    """
    base = lens.base
    slots = project(lens, acts)  # [P, B, d]
    embeds = prompt_embeds(lens, slots[0])
    with base.hooked(pre=_patch_plan(lens, slots)):
        hidden, cache = base.run_inner(embeds, use_cache=True)
    chosen = []
    for step in range(lens.config.t_text):
        logits = base.logits(hidden[:, -1])  # [B, vocab]
        tokens = choose_tokens(logits, temperature, generators)  # [B]
        chosen.append(tokens)
        if step + 1 < lens.config.t_text:
            hidden, cache = base.run_inner(tokens[:, None], cache=cache, use_cache=True)
    return torch.stack(chosen, dim=1)
