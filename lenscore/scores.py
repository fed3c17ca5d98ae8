"""Scores per position: mse, token salience, logit lens, KL (LENS_FORMAT.md §Metrics)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch

from lenscore.batch import EncodeWork, run_alone
from lenscore.lens import Lens


def mse_of(acts: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """mean((A - Â)²) over d in float32, [B]."""
    return (acts.float().to(recon.device) - recon).pow(2).mean(dim=-1)


def null_token_id(tokenizer: Any) -> int:
    """Return the token that blanks an explanation slot: first id of " ", else EOS."""
    ids = tokenizer.encode(" ", add_special_tokens=False)
    return int(ids[0]) if ids else int(tokenizer.eos_token_id)


def salience(
    lens: Lens,
    acts: torch.Tensor,
    expl: torch.Tensor,
    current: torch.Tensor,
    mse: torch.Tensor,
    batch_size: int,
    *,
    shared: bool = True,
) -> list[list[float]]:
    """`(mse_i - mse) / (mse + 1e-9)` with explanation token i blanked, [B][t].

    Args:
        acts: the activations explained, [B, d]. expl: their explanations, [B, t].
        current: the analysed token per row, [B]. mse: the full explanation's mse, [B].

    A slot that already holds the null token gets exactly 0. `shared` is `encode`'s.

    """
    steps = salience_steps(lens, acts, expl, current, mse, batch_size)
    return run_alone(steps, shared)


def salience_steps(
    lens: Lens,
    acts: torch.Tensor,
    expl: torch.Tensor,
    current: torch.Tensor,
    mse: torch.Tensor,
    batch_size: int,
) -> Generator[EncodeWork, torch.Tensor, list[list[float]]]:
    """`salience` as a generator of encode works of `batch_size`·t rows (`lenscore.batch`)."""
    batch, t = expl.shape
    null = null_token_id(lens.base.tokenizer)
    variants = expl[:, None, :].repeat(1, t, 1)  # [B, t, t]
    variants[:, torch.eye(t, dtype=torch.bool, device=expl.device)] = null
    flat = variants.view(batch * t, t)
    cur = current.repeat_interleave(t)
    targets = acts.repeat_interleave(t, 0)  # [B*t, d]
    errors = []
    step = max(batch_size, 1) * t
    for first in range(0, batch * t, step):
        rows = slice(first, first + step)
        recon = yield EncodeWork(lens, flat[rows], cur[rows])
        errors.append(mse_of(targets[rows], recon))
    blanked = torch.cat(errors).view(batch, t)  # [B, t]
    full = mse.to(blanked.device)[:, None]
    scores = (blanked - full) / (full + 1e-9)
    scores = torch.where(expl.to(scores.device) == null, torch.zeros_like(scores), scores)
    return scores.tolist()


@torch.no_grad()
def logit_lens_top(lens: Lens, acts: torch.Tensor) -> list[list[dict[str, Any]]]:
    """Top min(t_text, 10) tokens of the activation model's LM head on the raw activation."""
    model = lens.activation_model
    logits = model.lm_head(acts.to(model.dtype)).float()  # [B, vocab]; no norm, no soft-cap
    k = min(lens.config.t_text, 10)
    values, ids = logits.topk(k, dim=-1)
    tok = model.tokenizer
    return [
        [
            {
                "token": tok.decode([int(i)], skip_special_tokens=False),
                "token_id": int(i),
                "logit": float(v),
            }
            for v, i in zip(values[row], ids[row], strict=True)
        ]
        for row in range(acts.shape[0])
    ]


@torch.no_grad()
def kl_at_positions(
    lens: Lens,
    ids: torch.Tensor,
    positions: list[int],
    recon: torch.Tensor,
) -> list[float]:
    """KL(P_next(A) ‖ P_next(Â)) per position, Â (`recon`, [B, d]) patched after `layer_l`.

    Both distributions are the activation model's real next-token distributions (its full
    forward, final soft-capping included); only the one residual vector differs.
    """
    model = lens.activation_model
    end = max(positions) + 1
    prefix = ids[:, :end].to(model.device)  # [1, end]
    reference = torch.log_softmax(model.model(input_ids=prefix).logits[0].float(), dim=-1)
    rows = prefix.repeat(len(positions), 1)  # [B, end]
    where = torch.tensor(positions, device=model.device)

    def patch(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[torch.arange(len(positions)), where] = recon.to(hidden.dtype)
        return hidden

    with model.hooked(post={lens.config.layer_l: patch}):
        logits = model.model(input_ids=rows).logits.float()  # [B, end, vocab]
    patched = torch.log_softmax(logits[torch.arange(len(positions)), where], dim=-1)
    ref = reference[where]
    return (ref.exp() * (ref - patched)).sum(dim=-1).clamp_min(0).tolist()
