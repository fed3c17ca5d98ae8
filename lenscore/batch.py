"""Mixed-lens passes: decode and encode rows of several requests and lenses in one forward.

Below `analyze` on lenscore's data path. An analysis is a sequence of *works* (a
`DecodeWork`, then `EncodeWork`s) that `analyze` yields one at a time; `run_alone` runs each
work by itself through `decode`/`encode` (the unbatched path), and `run_works` runs works of
many requests, possibly of different lenses of one base, as one pass (DESIGN §Serving shape,
"Batching across requests").

Works can share a pass when their `shape_key`s are equal: same base object and, for a
decode, the same decoder prompt lengths (Lp, Rp); for an encode, the same soft prompt length
S and the same encoder input length after it (t + S2 + current token). Rows then line up
without padding and every row runs exactly the arithmetic it runs alone (LENS_FORMAT
§Decoding: the left prompt runs once per lens and its cache is copied to that lens's rows).
Inside a pass each row carries its own lens inputs: prompt embeddings, projected slot, the
patch vector of every patched layer (a [B, d] tensor per layer and the rows it applies to),
the encoder layer read and the output projection. t_text may differ (the pass runs the
longest; shorter rows keep their first t tokens), as may patched layers and temperatures.
Rows of different lengths are never padded: padding would change every row's float sums.
What remains is the kernels' own choice by batch size (a CPU GEMM of fewer than ~12 rows
takes another kernel and rounds differently), so floats agree to float32 rounding and token
ids agree unless a logit tie or a sampling draw sits within that rounding (LENS_FORMAT
§Sampling and seeds). (Past 400 lines: the works, the two pass kinds and the drivers that run
them belong together.)
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lenscore.base import expand_cache
from lenscore.decode import _slot_and_right, decode, project
from lenscore.encode import _soft_embeds, _tail_embeds, encode
from lenscore.lens import Lens
from lenscore.sampling import SampleKeys, choose_tokens, uniforms


@dataclass(frozen=True)
class DecodeWork:
    """Explanations to draw for one request's activations with one lens.

    `acts` is [B, d]; `repeats` the sampled rows per activation (one k, or [B] int64);
    `keys` the N sampled rows' randomness keys (None: greedy, or torch's global RNG).
    Row i·k + j of the result is sample j of activation i.
    """

    lens: Lens
    acts: torch.Tensor
    temperature: float
    keys: SampleKeys | None
    repeats: int | torch.Tensor = 1

    def counts(self) -> torch.Tensor:
        """Return the sampled rows per activation, [B] int64 on the CPU."""
        if isinstance(self.repeats, int):
            return torch.full((self.acts.shape[0],), self.repeats, dtype=torch.int64)
        return self.repeats.to("cpu", torch.int64)

    @property
    def units(self) -> int:
        """Activations: the pieces a pass may split this work into."""
        return int(self.acts.shape[0])

    @property
    def rows(self) -> int:
        """Sampled rows N (the batch of the decoding steps)."""
        return int(self.counts().sum())

    def unit_rows(self) -> list[int]:
        """Return the sampled rows of each activation."""
        return self.counts().tolist()

    def take(self, first: int, end: int) -> DecodeWork:
        """Activations first..end-1 with their sampled rows and keys."""
        counts = self.counts()
        start, stop = int(counts[:first].sum()), int(counts[:end].sum())
        keys = None
        if self.keys is not None:
            keys = SampleKeys(*(getattr(self.keys, f)[start:stop] for f in _KEY_FIELDS))
        repeats = self.repeats if isinstance(self.repeats, int) else self.repeats[first:end]
        return DecodeWork(self.lens, self.acts[first:end], self.temperature, keys, repeats)

    def run_alone(self, shared: bool = True) -> torch.Tensor:
        """`decode` of this work by itself, [N, t_text] int64."""
        return decode(
            self.lens,
            self.acts,
            temperature=self.temperature,
            keys=self.keys,
            repeats=self.repeats,
            shared=shared,
        )


@dataclass(frozen=True)
class EncodeWork:
    """Explanations to encode with one lens: ids [N, t] and the current token per row [N]."""

    lens: Lens
    explanation_ids: torch.Tensor
    current_ids: torch.Tensor | None

    @property
    def units(self) -> int:
        """Rows: the pieces a pass may split this work into."""
        return int(self.explanation_ids.shape[0])

    @property
    def rows(self) -> int:
        """Rows of the encoder pass."""
        return self.units

    def unit_rows(self) -> list[int]:
        """Return one row per unit."""
        return [1] * self.units

    def take(self, first: int, end: int) -> EncodeWork:
        """Rows first..end-1."""
        current = None if self.current_ids is None else self.current_ids[first:end]
        return EncodeWork(self.lens, self.explanation_ids[first:end], current)

    def run_alone(self, shared: bool = True) -> torch.Tensor:
        """`encode` of this work by itself, [N, d] float32."""
        return encode(self.lens, self.explanation_ids, self.current_ids, shared=shared)


Work = DecodeWork | EncodeWork
_KEY_FIELDS = ("seed", "position", "sample")
Steps = Generator[Work, torch.Tensor, Any]


def run_alone(steps: Steps, shared: bool = True) -> Any:
    """Drive a generator of works, running each by itself; return the generator's value.

    A work that raises (a device OOM, say) is thrown into the generator, which may turn it
    into a lenscore error.
    """
    try:
        work = next(steps)
        while True:
            try:
                result = work.run_alone(shared)
            except Exception as exc:  # noqa: BLE001 - re-raised inside the generator
                work = steps.throw(exc)
            else:
                work = steps.send(result)
    except StopIteration as stop:
        return stop.value


def shape_key(work: Work) -> tuple:
    """Works with equal keys can share one pass (module docstring)."""
    lens = work.lens
    base = lens.base
    if isinstance(work, DecodeWork):
        left, right = lens.tensors["prompt_left"], lens.tensors["prompt_right"]
        return ("decode", id(base), left.shape[0], right.shape[0])
    layer = lens.config.encoder_layer(len(base.layers))
    if layer == -2:  # the input of block 0: no base pass at all, nothing to share
        return ("encode-input", id(lens))
    soft = lens.tensors["soft_prompt"].shape[0]
    tail = work.explanation_ids.shape[1] + _postfix_rows(lens) + int(lens.config.add_current_token)
    return ("encode", id(base), soft, tail)


def _postfix_rows(lens: Lens) -> int:
    postfix = lens.tensors.get("soft_postfix")
    return 0 if postfix is None else int(postfix.shape[0])


def run_works(works: list[Work]) -> list[torch.Tensor]:
    """Run works of one shape key as one pass; each gets what `run_alone` would return.

    Raises:
        ValueError: the works have different shape keys.

    """
    keys = {shape_key(w) for w in works}
    if len(keys) != 1:
        raise ValueError(f"works of {len(keys)} shape keys cannot share a pass")
    if len(works) == 1 or next(iter(keys))[0] == "encode-input":
        return [w.run_alone() for w in works]
    if isinstance(works[0], DecodeWork):
        return decode_many(works)  # type: ignore[arg-type]
    return encode_many(works)  # type: ignore[arg-type]


def _lens_rows(works: list[Any], sizes: list[int]) -> tuple[list[Lens], torch.Tensor]:
    """Distinct lenses in order of appearance and the lens index of every row, [rows]."""
    lenses: list[Lens] = []
    index: list[int] = []
    for work, size in zip(works, sizes, strict=True):
        found = next((i for i, lens in enumerate(lenses) if lens is work.lens), None)
        if found is None:
            lenses.append(work.lens)
            found = len(lenses) - 1
        index += [found] * size
    return lenses, torch.tensor(index, dtype=torch.int64)


def _prefix_cache(lenses: list[Lens], prefixes: list[torch.Tensor], rows: torch.Tensor) -> Any:
    """KV cache of each lens's shared prefix (one row per lens), copied to its rows.

    `prefixes` are layer-0 inputs [S, d] of equal length, already scaled; `rows` [N] gives
    each row's lens index. One lens alone is exactly `Base.cache_prefix`.
    """
    base = lenses[0].base
    _, cache = base.run_inner(torch.stack(prefixes), use_cache=True)  # [L, S, d] in
    return expand_cache(cache, rows.to(base.device))


@torch.no_grad()
def decode_many(works: list[DecodeWork]) -> list[torch.Tensor]:
    """Decode works of one shape key in one prompt pass and one set of steps.

    Returns:
        One [N_i, t_text_i] int64 tensor per work, equal to `works[i].run_alone()`.

    """
    base = works[0].lens.base
    sizes = [w.units for w in works]
    lenses, lens_of_act = _lens_rows(works, sizes)
    slots = [project(w.lens, w.acts) for w in works]  # each [P_i, B_i, d]
    rest = torch.cat([_slot_and_right(w.lens, s[0]) for w, s in zip(works, slots, strict=True)])
    rest = rest.to(base.dtype) * base.embed_scale  # [B, 1+Rp, d]
    cache = None
    if lenses[0].tensors["prompt_left"].shape[0] > 0:
        lefts = [lens.tensors["prompt_left"].to(base.dtype) * base.embed_scale for lens in lenses]
        cache = _prefix_cache(lenses, lefts, lens_of_act)
    with base.hooked(pre=_mixed_patch_plan(works, slots)):
        hidden, cache = base.run_inner(rest, cache=cache, use_cache=True)
    logits = base.logits(hidden[:, -1])  # [B, vocab]
    counts = [w.counts() for w in works]
    if any(not (isinstance(w.repeats, int) and w.repeats == 1) for w in works):
        source = torch.arange(sum(sizes)).repeat_interleave(torch.cat(counts))  # [N]
        logits = logits[source.to(logits.device)]
        cache = expand_cache(cache, source.to(base.device))
    steps = max(w.lens.config.t_text for w in works)
    temperature, u = _draws(works, [int(c.sum()) for c in counts], steps, logits.device)
    chosen = []
    for step in range(steps):
        tokens = choose_tokens(logits, temperature, None if u is None else u[:, step])  # [N]
        chosen.append(tokens)
        if step + 1 < steps:
            hidden, cache = base.run_inner(tokens[:, None], cache=cache, use_cache=True)
            logits = base.logits(hidden[:, -1])
    ids = torch.stack(chosen, dim=1)  # [N, steps]
    parts = ids.split([int(c.sum()) for c in counts])
    return [part[:, : w.lens.config.t_text] for w, part in zip(works, parts, strict=True)]


def _mixed_patch_plan(works: list[DecodeWork], slots: list[torch.Tensor]) -> dict[int, Any]:
    """Per-layer pre-hooks writing each row's own slot vector; rows of unpatched lenses stay.

    The slot sits at index 0 of the chunk (the left prompt is in the cache). A layer's
    vector is [B, d]; rows whose lens does not patch that layer are left alone.
    """
    n_layers = len(works[0].lens.base.layers)
    patched = [w.lens.config.patched_layers(n_layers) for w in works]
    plan = {}
    for layer in range(max(patched)):
        values, mask = [], []
        for work, slot, count in zip(works, slots, patched, strict=True):
            cfg = work.lens.config
            row = cfg.projection_index(layer) if work.lens.per_layer else 0
            values.append(slot[row] if layer < count else torch.zeros_like(slot[0]))
            mask += [layer < count] * work.units
        plan[layer] = _patch(torch.cat(values), torch.tensor(mask))
    return plan


def _patch(value: torch.Tensor, mask: torch.Tensor) -> Any:
    every = bool(mask.all())
    rows = mask.nonzero()[:, 0].to(value.device)

    def patch(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        if every:
            hidden[:, 0] = value.to(hidden.dtype)
        else:
            hidden[rows, 0] = value[rows].to(hidden.dtype)
        return hidden

    return patch


def _draws(
    works: list[DecodeWork], rows: list[int], steps: int, device: torch.device
) -> tuple[float | torch.Tensor, torch.Tensor | None]:
    """Temperature (one value, or [N] per row) and uniforms [N, steps] (None when greedy)."""
    temps = {w.temperature for w in works}
    if temps == {0} or temps == {0.0}:
        return 0.0, None
    parts = []
    for work, n in zip(works, rows, strict=True):
        t = work.lens.config.t_text
        if work.keys is not None:
            u = uniforms(work.keys, t)
        elif work.temperature > 0:
            u = torch.rand(n, t, dtype=torch.float64)
        else:
            u = torch.zeros(n, t, dtype=torch.float64)
        parts.append(F.pad(u.cpu(), (0, steps - t)))
    u = torch.cat(parts).to(device)
    if len(temps) == 1:
        return float(works[0].temperature), u
    temperature = torch.cat(
        [torch.full((n,), float(w.temperature)) for w, n in zip(works, rows, strict=True)]
    )
    return temperature.to(device), u


@torch.no_grad()
def encode_many(works: list[EncodeWork]) -> list[torch.Tensor]:
    """Encode works of one shape key in one pass, reading each row at its lens's layer.

    Returns:
        One [N_i, d] float32 tensor per work, equal to `works[i].run_alone()`.

    """
    base = works[0].lens.base
    n_layers = len(base.layers)
    sizes = [w.rows for w in works]
    lenses, lens_of_row = _lens_rows(works, sizes)
    tail = torch.cat([_tail_embeds(w.lens, w.explanation_ids, w.current_ids) for w in works])
    cache = None
    if lenses[0].tensors["soft_prompt"].shape[0] > 0:
        cache = _prefix_cache(lenses, [_soft_embeds(lens) for lens in lenses], lens_of_row)
    layers = [w.lens.config.encoder_layer(n_layers) for w in works]
    grabbed = _capture_layers(base, tail, sorted(set(layers)), cache)
    out = []
    first = 0
    for work, layer, size in zip(works, layers, sizes, strict=True):
        hidden = grabbed[layer][first : first + size, -1].float()  # [N_i, d]
        first += size
        if work.lens.config.use_projection_layer:
            weight = work.lens.tensors["enc_proj_weight"]
            hidden = F.linear(hidden.to(weight.device), weight, work.lens.tensors["enc_proj_bias"])
        out.append(hidden)
    return out


class _StopPass(Exception):
    """Raised by a capture hook once the deepest block a pass needs has run."""


def _capture_layers(
    base: Any, embeds: torch.Tensor, layers: list[int], cache: Any
) -> dict[int, torch.Tensor]:
    """Return the outputs of decoder blocks `layers`, {layer: [B, seq, d]}.

    Like `Base.capture` for several layers at once: stops after the deepest (with `cache`,
    the cache is left half-updated and must not be reused).
    """
    found: dict[int, torch.Tensor] = {}
    last = layers[-1]

    def grab(layer: int) -> Any:
        def hook(hidden: torch.Tensor) -> None:
            found[layer] = hidden
            if layer == last:
                raise _StopPass

        return hook

    with base.hooked(post={layer: grab(layer) for layer in layers}):
        try:
            base.run_inner(embeds, cache=cache, use_cache=cache is not None)
        except _StopPass:
            pass
    return found


def run_together(all_steps: list[Steps]) -> list[Any]:
    """Drive several generators at once: each round, works of one shape key share a pass.

    A plain in-process driver (tests, bench, notebooks); the replica's scheduler adds row
    caps, fairness and cancellation. Returns each generator's value; the first error raises.
    """
    results: dict[int, Any] = {}
    pending: dict[int, Work] = {}
    for index in range(len(all_steps)):
        _step(all_steps, index, None, pending, results)
    while pending:
        by_key: dict[tuple, list[int]] = {}
        for index, work in pending.items():
            by_key.setdefault(shape_key(work), []).append(index)
        for indices in by_key.values():
            outputs = run_works([pending.pop(i) for i in indices])
            for index, output in zip(indices, outputs, strict=True):
                _step(all_steps, index, output, pending, results)
    return [results[i] for i in range(len(all_steps))]


def _step(
    all_steps: list[Steps],
    index: int,
    value: torch.Tensor | None,
    pending: dict[int, Work],
    results: dict[int, Any],
) -> None:
    try:
        steps = all_steps[index]
        pending[index] = next(steps) if value is None else steps.send(value)
    except StopIteration as stop:
        results[index] = stop.value
