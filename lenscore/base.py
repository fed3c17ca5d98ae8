"""Base and donor models: loaded once, shared by every lens attached to them.

A `Base` wraps a Hugging Face causal LM and its tokenizer and exposes the few parts the lens
math touches (decoder layers, embedding module and its scale, inner model, LM head). Donors
are `Base` objects too: same architecture, other weights (LENS_FORMAT.md §Vocabulary).
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lenscore.errors import BaseLoadError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BaseInfo:
    """What compatibility checks need from a base directory; no weights are read."""

    path: Path
    model_type: str
    n_layers: int
    d: int
    vocab_size: int
    tokenizer: Any


def read_base_info(path: str | Path) -> BaseInfo:
    """Read a base directory's config and tokenizer (cheap: no weights).

    Raises:
        BaseLoadError: no config.json / tokenizer there.

    """
    from transformers import AutoConfig

    path = _model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = _load_tokenizer(path)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise BaseLoadError(f"cannot read base model at {path}: {exc}") from exc
    return _info_from(path, config, tokenizer)


def _model_dir(path: str | Path) -> Path:
    # Without this check transformers reads a missing directory as a hub id and reports a
    # confusing repo-name error; lens-serve never downloads.
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BaseLoadError(f"no model directory at {path} (expected {path / 'config.json'})")
    return path


def _info_from(path: Path, config: Any, tokenizer: Any) -> BaseInfo:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return BaseInfo(
        path=path,
        model_type=str(text.model_type),
        n_layers=int(text.num_hidden_layers),
        d=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        tokenizer=tokenizer,
    )


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _attn_implementation(model_type: str) -> str | None:
    # Gemma 2 soft-caps attention logits, which sdpa ignores (LENS_FORMAT.md §Decoding).
    if model_type == "gemma2":
        return "eager"
    return None


class Base:
    """A loaded causal LM + tokenizer; lenses hold a reference, never a copy."""

    def __init__(self, path: Path, model: nn.Module, tokenizer: Any, info: BaseInfo) -> None:
        self.path = path
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.load_seconds = 0.0
        inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.inner: nn.Module = inner
        self.layers: nn.ModuleList = inner.layers
        self.embed: nn.Module = model.get_input_embeddings()
        self.lm_head: nn.Module = model.get_output_embeddings()
        self._cache_kw = _cache_keyword(inner)
        # Hooks are installed once and read a per-thread plan: lenses of one base may run in
        # several threads at once, and a plan set by one request must never touch another's.
        self._plans = threading.local()
        self._install_hooks()

    def _install_hooks(self) -> None:
        for index, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True)
            layer.register_forward_hook(self._post_hook(index))

    def _pre_hook(self, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            plan = getattr(self._plans, "pre", None)
            if not plan or index not in plan:
                return None
            if args:
                return (plan[index](args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = plan[index](kwargs["hidden_states"])
            return args, kwargs

        return hook

    def _post_hook(self, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            plan = getattr(self._plans, "post", None)
            if not plan or index not in plan:
                return None
            # transformers 4 returns a tuple from a decoder layer, 5 a tensor.
            hidden = output[0] if isinstance(output, tuple) else output
            new = plan[index](hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    @contextmanager
    def hooked(
        self,
        pre: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        post: dict[int, Callable[[torch.Tensor], torch.Tensor | None]] | None = None,
    ) -> Iterator[None]:
        """Run the block with per-layer hooks active for this thread only.

        `pre[i]` maps the hidden state entering layer i to a replacement; `post[i]` sees the
        layer's output and may return a replacement (None keeps it).
        """
        old = (getattr(self._plans, "pre", None), getattr(self._plans, "post", None))
        self._plans.pre, self._plans.post = pre, post
        try:
            yield
        finally:
            self._plans.pre, self._plans.post = old

    def capture(self, embeds_or_ids: torch.Tensor, layer: int, cache: Any = None) -> torch.Tensor:
        """Output of decoder block `layer` (the residual stream after it), [B, seq, d].

        Stops the forward after that block: later layers cannot change it. With `cache` (a
        prefix's KV cache of B rows, e.g. from `run_inner`) the input continues that prefix;
        the cache is left half-updated and must not be reused.
        """
        found: list[torch.Tensor] = []

        def grab(hidden: torch.Tensor) -> None:
            found.append(hidden)
            raise _StopForward

        kwargs: dict[str, Any] = {**self._input_kwargs(embeds_or_ids), "use_cache": False}
        if cache is not None:
            kwargs.update({self._cache_kw: cache, "use_cache": True})
        with self.hooked(post={layer: grab}):
            try:
                self.inner(**kwargs)
            except _StopForward:
                pass
        return found[0]

    def _input_kwargs(self, embeds_or_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if embeds_or_ids.dtype in (torch.int64, torch.int32):
            return {"input_ids": embeds_or_ids.to(self.device)}
        return {"inputs_embeds": embeds_or_ids}

    def logits(self, hidden: torch.Tensor, *, softcap: bool = False) -> torch.Tensor:
        """Apply the LM head to final-normed hidden states; float32 logits.

        `softcap` applies the model's final-logit soft-capping (Gemma 2) where it has one.
        """
        logits = self.lm_head(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap and cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Weight dtype of the embedding (the model's compute dtype)."""
        return self.embed.weight.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of parameters and buffers (tied weights counted once)."""
        seen: set[int] = set()
        total = 0
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
        return total

    @property
    def embed_scale(self) -> torch.Tensor:
        """Scale the embedding module applies to token rows (√d for Gemma 2/3, else 1)."""
        scale = getattr(self.embed, "embed_scale", None)
        if scale is None:
            return torch.tensor(1.0, dtype=self.dtype, device=self.device)
        # HF rounds the scale to the weight dtype; soft vectors must follow the module.
        return torch.as_tensor(scale, device=self.device).to(self.dtype)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Embed token ids exactly as the model does (scale included)."""
        return self.embed(ids.to(self.device))

    def run_inner(
        self, embeds_or_ids: torch.Tensor, cache: Any = None, use_cache: bool = False
    ) -> tuple[torch.Tensor, Any]:
        """Run the decoder stack; returns (final-normed hidden states, cache)."""
        kwargs: dict[str, Any] = {**self._input_kwargs(embeds_or_ids), "use_cache": use_cache}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        out = self.inner(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.last_hidden_state, new_cache

    def cache_prefix(self, embeds: torch.Tensor, rows: int) -> Any:
        """Run one shared prefix once and return its KV cache expanded to `rows` rows.

        Args:
            embeds: layer-0 input of the prefix, [seq, d] (already scaled).
            rows: batch size of the passes that continue it.

        """
        _, cache = self.run_inner(embeds[None], use_cache=True)
        return expand_cache(cache, torch.zeros(rows, dtype=torch.int64, device=embeds.device))

    def to(self, device: str | torch.device) -> Base:
        """Move the weights (in place) and return self."""
        self.model.to(device)
        return self


def expand_cache(cache: Any, rows: torch.Tensor) -> Any:
    """Make row i of `cache` a copy of its row `rows[i]`, in place; returns the cache.

    Args:
        cache: a transformers KV cache (full, sliding-window or hybrid layers).
        rows: [N] int64 source rows; N may exceed the cache's batch (expansion).

    `reorder_cache` index-selects the batch dimension of every layer's keys and values and
    leaves the per-layer window bookkeeping (`cumulative_length`) alone, which is the same
    for every row, so Gemma 2's sliding-window layers keep masking exactly as before.

    """
    cache.reorder_cache(rows)
    return cache


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


def _cache_keyword(inner: nn.Module) -> str:
    # transformers 5 renamed `past_key_values` to `cache`; accept whichever this version has.
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def load_base(
    path: str | Path, *, dtype: str = "float32", device: str | torch.device = "cpu"
) -> Base:
    """Load a base (or donor) model directory onto a device, in eval mode, no grad.

    Raises:
        BaseLoadError: the directory is not a loadable causal LM, or `dtype` is unknown.

    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # The per-tensor progress bar is noise on stderr for a CLI and in replica logs.
    hf_logging.disable_progress_bar()
    path = _model_dir(path)
    if dtype not in DTYPES:
        raise BaseLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    started = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = _load_tokenizer(path)
        info = _info_from(path, config, tokenizer)
        kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "local_files_only": True}
        attn = _attn_implementation(info.model_type)
        if attn:
            kwargs["attn_implementation"] = attn
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise BaseLoadError(f"cannot load base model at {path}: {exc}") from exc
    model.eval().requires_grad_(False)
    model.to(device)
    base = Base(path, model, tokenizer, info)
    base.load_seconds = time.perf_counter() - started
    log.info(
        "loaded base %s (%d bytes) on %s in %.2fs", path, base.nbytes, device, base.load_seconds
    )
    return base
