"""Decoder: activation -> explanation token ids (LENS_FORMAT.md §Decoding).

The lens's soft prompt and projected activation go through the shared base with the KV cache;
per-layer patching is a forward pre-hook on the base's decoder layers, never a re-implemented
forward. The prompt runs once per activation, not once per sample: the left prompt (the same
for every row of a lens) runs once per batch, the slot and right prompt once per activation,
and the cache is then expanded to the sampled rows (best-of-k: k per activation). Token
choice follows the seed contract of `lenscore.sampling`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lenscore.base import expand_cache
from lenscore.lens import Lens
from lenscore.sampling import SampleKeys, choose_tokens, uniforms


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
    left = lens.tensors["prompt_left"]  # [Lp, d]
    batch = slot.shape[0]
    rows = torch.cat([left.expand(batch, -1, -1), _slot_and_right(lens, slot)], dim=1)
    return rows.to(lens.base.dtype) * lens.base.embed_scale


def _slot_and_right(lens: Lens, slot: torch.Tensor) -> torch.Tensor:
    right = lens.tensors["prompt_right"]  # [Rp, d]
    return torch.cat([slot[:, None].to(right.dtype), right.expand(slot.shape[0], -1, -1)], dim=1)


def _patch_plan(lens: Lens, slots: torch.Tensor, at: int) -> dict[int, Callable]:
    """Pre-hooks that overwrite the activation slot entering each patched layer, unscaled.

    `at` is the slot's index in the chunk the hooks see (Lp for the whole prompt, 0 when
    the left prompt is already in the cache). The hooks are active for the prompt pass only.
    """
    cfg = lens.config
    n_patch = cfg.patched_layers(len(lens.base.layers))

    def make(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        row = cfg.projection_index(layer) if lens.per_layer else 0
        value = slots[row]  # [B, d]

        def patch(hidden: torch.Tensor) -> torch.Tensor:
            hidden = hidden.clone()
            hidden[:, at] = value.to(hidden.dtype)
            return hidden

        return patch

    return {layer: make(layer) for layer in range(n_patch)}


def _prompt_pass_shared(lens: Lens, slots: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Run the prompt; return the last position's hidden state [B, d] and cache (B rows).

    The left prompt precedes the slot, so under the causal mask it is the same for every row
    and no patch touches it: one row computes it, the cache copies it to B rows.
    """
    base = lens.base
    left = lens.tensors["prompt_left"]  # [Lp, d]
    batch = slots.shape[1]
    cache = None
    if left.shape[0] > 0:
        cache = base.cache_prefix(left.to(base.dtype) * base.embed_scale, batch)
    rest = _slot_and_right(lens, slots[0]).to(base.dtype) * base.embed_scale  # [B, 1+Rp, d]
    with base.hooked(pre=_patch_plan(lens, slots, at=0)):
        hidden, cache = base.run_inner(rest, cache=cache, use_cache=True)
    return hidden[:, -1], cache


def _prompt_pass_unshared(lens: Lens, slots: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Run the reference prompt pass: every row runs the whole prompt (as before issue 12)."""
    base = lens.base
    embed_pos = lens.tensors["prompt_left"].shape[0]
    with base.hooked(pre=_patch_plan(lens, slots, at=embed_pos)):
        hidden, cache = base.run_inner(prompt_embeds(lens, slots[0]), use_cache=True)
    return hidden[:, -1], cache


def _source_rows(repeats: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Activation row of each sampled row, [N] int64, activation-major."""
    index = torch.arange(batch, device=device)
    if isinstance(repeats, int):
        return index.repeat_interleave(repeats)
    return index.repeat_interleave(repeats.to(device))


@torch.no_grad()
def decode(
    lens: Lens,
    acts: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.0,
    keys: SampleKeys | None = None,
    repeats: int | torch.Tensor = 1,
    shared: bool = True,
) -> torch.Tensor:
    """Generate exactly `t_text` explanation ids per sampled row.

    Args:
        acts: activations at the lens's layer, [B, d].
        temperature: 0 = argmax; one value, or [N] per sampled row.
        keys: randomness keys of the N sampled rows (`lenscore.sampling`); None draws from
            torch's global RNG.
        repeats: sampled rows per activation: one k for all, or [B] int64 counts.
        shared: False runs the unshared reference path (every row runs the whole prompt);
            it chooses the same tokens and serves tests and bench/bestofk.py.

    Returns:
        Token ids, [N, t_text] int64 on the base's device, N = B·k (or sum of repeats);
        row i·k + j is sample j of activation i.

    """
    base = lens.base
    slots = project(lens, acts)  # [P, B, d]
    batch = slots.shape[1]
    source = _source_rows(repeats, batch, slots.device)  # [N]
    expand = not (isinstance(repeats, int) and repeats == 1)
    if shared:
        hidden, cache = _prompt_pass_shared(lens, slots)
        # The k rows of one activation are identical until their first draw: expand only
        # the cache and the first logits, never the prompt pass.
        logits = base.logits(hidden)  # [B, vocab]
        if expand:
            logits = logits[source.to(logits.device)]
            cache = expand_cache(cache, source.to(base.device))
    else:
        many = slots[:, source] if expand else slots  # [P, N, d]
        hidden, cache = _prompt_pass_unshared(lens, many)
        logits = base.logits(hidden)  # [N, vocab]
    steps = lens.config.t_text
    u = uniforms(keys, steps).to(logits.device) if keys is not None else None  # [N, t]
    chosen = []
    for step in range(steps):
        tokens = choose_tokens(logits, temperature, None if u is None else u[:, step])  # [N]
        chosen.append(tokens)
        if step + 1 < steps:
            hidden, cache = base.run_inner(tokens[:, None], cache=cache, use_cache=True)
            logits = base.logits(hidden[:, -1])
    return torch.stack(chosen, dim=1)
