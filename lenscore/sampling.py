"""Seeded token choice for many rows in one draw (LENS_FORMAT.md §Analysis input, Randomness).

Seed contract: a sampled row is keyed by (seed, position, sample). At generation step s (0
first) it draws one number u = U(seed, position, sample, s) in [0, 1) from a counter-based
hash: 32-bit `lowbias32` rounds absorb the seed's low and high 32-bit words, the position,
the sample, the step, then a word index (1 and 2) for two 32-bit outputs, of which 27 + 26
bits make u (exact in float64). The chosen token is the first vocabulary id whose cumulative
probability exceeds u × total, with p = softmax(logits / T) in float32, summed in float64 in
vocabulary order (inverse-CDF sampling). Temperature 0 is the argmax and draws nothing; a
temperature so small that logits / T overflows is its limit, the argmax, too. Nothing else
enters a row's choice: batch size, batch composition, the k of other positions and torch's
RNG state do not. `analyze` keys row (position p, sample j) with the token index p in the
text and j in 0..k-1 (best-of-1 is sample 0); `generate` keys continuation i with position
i and sample 0. The hash is integer arithmetic, identical on every device; two machines
differ only where their logits differ by float rounding and u lies that close to a boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9  # added in each round so that an all-zero key does not stay zero
_SALT = 0x6C656E73  # "lens": the hash's starting state


@dataclass(frozen=True)
class SampleKeys:
    """Randomness keys of sampled rows: row r draws from (seed[r], position[r], sample[r]).

    Each field is [N] int64 on one device; seed within 0..2**63-1, the others within
    0..2**32-1. Rows of different requests (other seeds) may share one decode.
    """

    seed: torch.Tensor
    position: torch.Tensor
    sample: torch.Tensor

    @classmethod
    def grid(
        cls,
        seed: int,
        positions: Sequence[int],
        samples: int | Sequence[int],
        device: torch.device | str = "cpu",
    ) -> SampleKeys:
        """Keys of `samples` rows per position, position-major (row i·k + j is sample j).

        `samples` is one k for all positions or one k per position.
        """
        pos = torch.as_tensor(list(positions), dtype=torch.int64, device=device)  # [B]
        if isinstance(samples, int):
            counts = torch.full_like(pos, samples)
        else:
            counts = torch.as_tensor(list(samples), dtype=torch.int64, device=device)
        rows = int(counts.sum())
        starts = torch.cumsum(counts, dim=0) - counts  # first row of each position
        sample = torch.arange(rows, device=device) - starts.repeat_interleave(counts)
        return cls(
            seed=torch.full((rows,), seed, dtype=torch.int64, device=device),
            position=pos.repeat_interleave(counts),
            sample=sample,
        )

    def __len__(self) -> int:
        return int(self.seed.shape[0])


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x · c) mod 2**32 in 16-bit halves: int64 never overflows (overflow is undefined in C++).
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # lowbias32 (C. Wellons): a full-avalanche 32-bit integer hash.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(state: torch.Tensor, word: torch.Tensor | int) -> torch.Tensor:
    return _mix32(((state ^ (word & _MASK32)) + _GOLDEN32) & _MASK32)


def uniforms(keys: SampleKeys, steps: int) -> torch.Tensor:
    """Draw U(seed, position, sample, step) for every row and step, [N, steps] float64 in [0, 1)."""
    state = torch.full_like(keys.seed, _SALT)
    state = _absorb(state, keys.seed & _MASK32)
    state = _absorb(state, keys.seed >> 32)
    state = _absorb(state, keys.position)
    state = _absorb(state, keys.sample)
    step = torch.arange(steps, dtype=torch.int64, device=keys.seed.device)
    state = _absorb(state[:, None], step[None, :])  # [N, steps]
    high = _absorb(state, 1) >> 5  # 27 bits
    low = _absorb(state, 2) >> 6  # 26 bits
    return (high * (1 << 26) + low).double() / float(1 << 53)


def choose_tokens(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row: argmax at temperature 0, else inverse-CDF at `u`.

    Args:
        logits: [N, vocab] float.
        temperature: one for all rows, or [N] (rows at 0 take the argmax).
        u: [N] float64 in [0, 1), the rows' draws for this step (`uniforms`); None draws
            from torch's global RNG (unseeded).

    Returns:
        [N] int64 token ids.

    """
    greedy = logits.argmax(dim=-1)
    if not isinstance(temperature, torch.Tensor) and temperature == 0:
        return greedy
    rows = logits.shape[0]
    temp = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).expand(rows)
    probs = torch.softmax(logits.float() / temp[:, None], dim=-1)
    # A temperature so small that logits / T overflows: its limit is the argmax.
    sampled = torch.isfinite(probs).all(dim=-1) & (temp > 0)
    if u is None:
        u = torch.rand(rows, dtype=torch.float64, device=logits.device)
    cdf = probs.double().cumsum(dim=-1)  # [N, vocab]
    target = (u.to(cdf.device) * cdf[:, -1])[:, None]
    picked = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(logits.shape[-1] - 1)
    return torch.where(sampled, picked, greedy)
