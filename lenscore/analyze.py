"""Per-token analysis and plain generation: the top of lenscore's data path.

`analyze` reads the activation at every requested position once, then decodes, encodes and
scores positions batch by batch (LENS_FORMAT.md §Metrics per position, §Result row). Sampled
rows follow the seed contract of `lenscore.sampling`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Generator
from typing import Any

import torch

from lenscore.base import Base, expand_cache
from lenscore.batch import DecodeWork, EncodeWork, Steps, Work, run_alone
from lenscore.errors import BadInput, Cancelled, OutOfDeviceMemory
from lenscore.inputs import Tokens, tokenize_input
from lenscore.lens import Lens
from lenscore.options import AnalysisOptions, check_bound
from lenscore.sampling import SampleKeys, choose_tokens, uniforms
from lenscore.scores import kl_at_positions, logit_lens_top, mse_of, salience_steps

DEFAULT_BATCH_SIZE = 32
# (activation model, ids [1, T], layer) -> activations [T, d]
ReadActivations = Callable[[Base, torch.Tensor, int], torch.Tensor]


def select_positions(tokens: Tokens, options: AnalysisOptions) -> list[int]:
    """Positions to analyse: all, the explicit list, or the last n messages' tokens.

    Raises:
        BadInput: a requested position is beyond the input.

    """
    total = len(tokens.ids)
    if options.positions is not None:
        bad = [p for p in options.positions if p >= total]
        if bad:
            raise BadInput(f"positions {bad} are beyond the input's {total} tokens")
        return sorted(set(options.positions))
    if options.last_n_messages is not None:
        starts = tokens.message_starts
        first = starts[max(len(starts) - options.last_n_messages, 0)]
        return list(range(first, total))
    return list(range(total))


def analyze(
    lens: Lens,
    *,
    text: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    options: AnalysisOptions | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    shared: bool = True,
    read_activations: ReadActivations | None = None,
) -> dict[str, Any]:
    """Explain every requested token of `text` / `messages` with `lens`.

    Runs `analysis_steps` with every decode and encode by itself (`lenscore.batch.run_alone`).

    Args:
        shared: False runs the unshared reference path: every sampled row runs the whole
            decoder prompt and encoder input. Same results, slower; for tests and bench.
        read_activations: `(model, ids [1, T], layer) -> [T, d]`, e.g. a cache; default:
            one forward of the activation model (`Base.capture`).

    Returns:
        `{"meta": {...}, "rows": [...]}` as LENS_FORMAT.md §Result row says.

    Raises:
        BadInput: bad input or options. Cancelled: `should_stop()` said so between batches.
        OutOfDeviceMemory: an allocation failed on the device.

    """
    steps = analysis_steps(
        lens,
        text=text,
        messages=messages,
        options=options,
        on_progress=on_progress,
        should_stop=should_stop,
        read_activations=read_activations,
    )
    return run_alone(steps, shared)


def capture_activations(model: Base, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Activations after block `layer` at every position of `ids` [1, T], [T, d]."""
    with torch.no_grad():
        return model.capture(ids, layer)[0]


def analysis_steps(
    lens: Lens,
    *,
    text: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    options: AnalysisOptions | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    read_activations: ReadActivations | None = None,
) -> Steps:
    """`analyze` as a generator: yields each decode and encode work, receives its result.

    Whoever drives it may run a work alone (`run_alone`) or in a pass shared with other
    requests' works (`lenscore.batch.run_works`); the rows are the same. Everything else
    (tokenising, activations, scores, rows) runs inside the generator. Returns `analyze`'s
    result; raises its errors (a device OOM thrown in becomes OutOfDeviceMemory).
    """
    options = options or AnalysisOptions()
    options.validate()
    started = time.perf_counter()
    tokens = tokenize_input(lens.base.tokenizer, text, messages)
    positions = select_positions(tokens, options)
    seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(7), "big")
    batch_size = options.batch_size or DEFAULT_BATCH_SIZE
    resolved = dataclasses.replace(options, seed=seed, batch_size=batch_size)
    ids = torch.tensor([tokens.ids], device=lens.activation_model.device)  # [1, T]
    read = read_activations or capture_activations
    try:
        acts = read(lens.activation_model, ids, lens.config.layer_l)  # [T, d]
        read_at = time.perf_counter()
        rows = yield from _analyze_batches(
            lens, ids, acts, positions, resolved, on_progress, should_stop
        )
    except torch.OutOfMemoryError as exc:
        raise OutOfDeviceMemory(
            f"out of device memory analysing {len(positions)} positions with lens "
            f"{lens.lens_id} (batch size {batch_size}): retry with a smaller batch_size",
            {"batch_size": batch_size},
        ) from exc
    finished = time.perf_counter()
    meta = {
        "lens_id": lens.lens_id,
        "layer": lens.config.layer_l,
        "t_text": lens.config.t_text,
        "base_model": str(lens.base.path),
        "donor": str(lens.donor.path) if lens.donor is not None else None,
        "checkpoint": str(lens.checkpoint_path),
        "n_tokens": len(tokens.ids),
        "options": resolved.to_dict(),
        "timings": {
            "activations_seconds": round(read_at - started, 6),
            "analysis_seconds": round(finished - read_at, 6),
            "total_seconds": round(finished - started, 6),
        },
    }
    return {"meta": meta, "rows": rows}


def _analyze_batches(
    lens: Lens,
    ids: torch.Tensor,
    acts: torch.Tensor,
    positions: list[int],
    options: AnalysisOptions,
    on_progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> Generator[Work, torch.Tensor, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    size = options.batch_size or DEFAULT_BATCH_SIZE
    for first in range(0, len(positions), size):
        if should_stop is not None and should_stop():
            raise Cancelled(f"analysis with lens {lens.lens_id} cancelled by the caller")
        chunk = positions[first : first + size]
        rows += yield from positions_steps(lens, ids, acts, chunk, options)
        if on_progress is not None:
            on_progress(len(rows), len(positions))
    return rows


def _explain_steps(
    lens: Lens,
    acts: torch.Tensor,
    current: torch.Tensor,
    positions: list[int],
    options: AnalysisOptions,
) -> Generator[Work, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Explanation ids [B, t], their reconstructions [B, d] and mse [B].

    Best-of-k keeps the lowest-mse sample of each position. Sample j of a position is keyed
    (seed, position, j), so best-of-1 is sample 0 of best-of-k at the same temperature.
    """
    k = options.best_of_k
    temperature = options.temperature if k == 1 else options.sample_temperature
    keys = None
    if temperature > 0:
        keys = SampleKeys.grid(options.seed, positions, k, lens.base.device)
    many = yield DecodeWork(lens, acts, temperature, keys, k)  # [B*k, t]
    recons = yield EncodeWork(lens, many, current.repeat_interleave(k))  # [B*k, d]
    errors = mse_of(acts.repeat_interleave(k, 0), recons)
    best = errors.view(-1, k).argmin(dim=1)  # [B]
    pick = torch.arange(len(positions), device=best.device) * k + best
    return many[pick], recons[pick], errors[pick]


def analyze_positions(
    lens: Lens,
    ids: torch.Tensor,
    acts: torch.Tensor,
    positions: list[int],
    options: AnalysisOptions,
    *,
    shared: bool = True,
) -> list[dict[str, Any]]:
    """Compute the result rows for one batch of positions (`shared`: see `analyze`)."""
    return run_alone(positions_steps(lens, ids, acts, positions, options), shared)


def positions_steps(
    lens: Lens,
    ids: torch.Tensor,
    acts: torch.Tensor,
    positions: list[int],
    options: AnalysisOptions,
) -> Generator[Work, torch.Tensor, list[dict[str, Any]]]:
    """`analyze_positions` as a generator of works (see `analysis_steps`)."""
    index = torch.tensor(positions, device=acts.device)
    batch_acts = acts[index]  # [B, d]
    current = ids[0, index].to(lens.base.device)  # [B]
    expl, recon, mse = yield from _explain_steps(lens, batch_acts, current, positions, options)
    norm = batch_acts.float().pow(2).mean(dim=-1).sqrt()
    rel = mse.sqrt().cpu() / norm.cpu()
    size = options.batch_size or DEFAULT_BATCH_SIZE
    sal = None
    if options.calculate_salience:
        sal = yield from salience_steps(lens, batch_acts, expl, current, mse, size)
    tops = logit_lens_top(lens, batch_acts) if options.logit_lens else None
    kls = kl_at_positions(lens, ids, positions, recon) if options.kl else None
    return [
        _row(
            lens,
            positions[i],
            int(current[i]),
            expl[i].tolist(),
            float(mse[i]),
            float(rel[i]),
            None if sal is None else sal[i],
            None if tops is None else tops[i],
            None if kls is None else kls[i],
        )
        for i in range(len(positions))
    ]


def _row(
    lens: Lens,
    position: int,
    token_id: int,
    expl_ids: list[int],
    mse: float,
    rel: float,
    sal: list[float] | None,
    top: list[dict[str, Any]] | None,
    kl: float | None,
) -> dict[str, Any]:
    tok = lens.base.tokenizer
    token = tok.decode([token_id], skip_special_tokens=False)
    explanation = tok.decode(expl_ids, skip_special_tokens=False)
    if lens.config.add_current_token:
        explanation += f"[{token}]"
    row: dict[str, Any] = {
        "position": position,
        "token": token,
        "token_id": token_id,
        "explanation": explanation,
        "explanation_tokens": [tok.decode([i], skip_special_tokens=False) for i in expl_ids],
        "explanation_token_ids": expl_ids,
        "mse": mse,
        "relative_rmse": rel,
        "token_salience": sal,
    }
    if top is not None:
        row["logit_lens_top"] = top
    if kl is not None:
        row["kl"] = kl
    return row


def generate(
    lens: Lens,
    *,
    text: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int | None = None,
    num_continuations: int = 1,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Sample continuations from the lens's activation model (donor if any, else base).

    The prompt runs once; its cache is expanded to the continuations. Continuation i draws
    with keys (seed, i, 0) (`lenscore.sampling`). `should_stop` is asked before each token.

    Raises:
        BadInput: bad input or bounds (max_new_tokens 1..1024, temperature 0..2,
            num_continuations 1..16).
        Cancelled: `should_stop()` said so. OutOfDeviceMemory: an allocation failed.

    """
    check_bound("max_new_tokens", max_new_tokens)
    check_bound("num_continuations", num_continuations)
    AnalysisOptions(temperature=temperature, seed=seed).validate()
    model = lens.activation_model
    tokens = tokenize_input(model.tokenizer, text, messages)
    seed = seed if seed is not None else int.from_bytes(os.urandom(7), "big")
    started = time.perf_counter()
    ids = torch.tensor([tokens.ids], device=model.device)  # [1, T]
    keys = SampleKeys.grid(seed, range(num_continuations), 1, model.device)
    u = uniforms(keys, max_new_tokens)  # [N, max_new_tokens]
    try:
        new_ids = _continue(model, ids, num_continuations, max_new_tokens, temperature, u,
                            should_stop)  # fmt: skip
    except torch.OutOfMemoryError as exc:
        raise OutOfDeviceMemory(
            f"out of device memory generating with lens {lens.lens_id}",
            {"lens_id": lens.lens_id, "num_continuations": num_continuations},
        ) from exc
    if new_ids is None:
        raise Cancelled(f"generation with lens {lens.lens_id} cancelled by the caller")
    conts = [
        {"text": model.tokenizer.decode(row, skip_special_tokens=False), "token_ids": row}
        for row in new_ids
    ]
    meta = {
        "lens_id": lens.lens_id,
        "model": model.path.name,
        "seed": seed,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "timings": {"total_seconds": round(time.perf_counter() - started, 6)},
    }
    return {"meta": meta, "continuations": conts}


def _continue(
    model: Any,
    ids: torch.Tensor,
    n: int,
    max_new_tokens: int,
    temperature: float,
    u: torch.Tensor,
    should_stop: Callable[[], bool] | None,
) -> list[list[int]] | None:
    """Generate `max_new_tokens` for `n` copies of the prompt `ids` [1, T]; None if stopped."""
    out = []
    with torch.no_grad():
        hidden, cache = model.run_inner(ids, use_cache=True)
        rows = torch.zeros(n, dtype=torch.int64, device=model.device)
        cache = expand_cache(cache, rows)
        logits = model.logits(hidden[:, -1], softcap=True)[rows]  # [N, vocab]
        for step in range(max_new_tokens):
            if should_stop is not None and should_stop():
                return None
            chosen = choose_tokens(logits, temperature, u[:, step])  # [N]
            out.append(chosen)
            if step + 1 < max_new_tokens:
                hidden, cache = model.run_inner(chosen[:, None], cache=cache, use_cache=True)
                logits = model.logits(hidden[:, -1], softcap=True)
    return torch.stack(out, dim=1).tolist()
