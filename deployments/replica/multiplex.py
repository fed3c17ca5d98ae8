"""The device tier as Serve's multiplex LRU: the one module that touches its internals.

`serve.multiplexed` is public, but shrinking its LRU, evicting one chosen model and reading
which models it holds are not: they use `_ModelMultiplexWrapper`'s `models`,
`_model_cache_lock`, `max_num_models_per_replica` and `_push_multiplexed_replica_info`
(Ray 2.60). Everything else in the replica goes through `DeviceSlots`, and
tests/deployments/test_multiplex.py fails under real Serve if a Ray upgrade changes them.
Outside a Serve replica (bench/switch.py) a local LRU with the same contract stands in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray import serve

from deployments.replica.tiers import ResidentLens

# The attribute `serve.multiplexed` stores its wrapper under, on the decorated function.
SERVE_WRAPPER_ATTR = "__serve_multiplex_wrapper"

LoadLens = Callable[[str], Awaitable[ResidentLens]]


class LocalMultiplexer:
    """An in-process LRU with the contract of Serve's multiplex wrapper, for use without Serve.

    Same fields and order of events as Ray 2.60's `_ModelMultiplexWrapper`: one load at a
    time under a lock, evict the LRU model (awaiting its `__del__`) before loading when full.
    """

    def __init__(self, load: LoadLens, max_num_models_per_replica: int) -> None:
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.max_num_models_per_replica = max_num_models_per_replica
        self._push_multiplexed_replica_info = False
        self._func = load
        self._model_cache_lock = asyncio.Lock()

    async def load_model(self, model_id: str) -> Any:
        """Return the model, loading it (and evicting the LRU one) when absent."""
        if model_id in self.models:
            self.models.move_to_end(model_id)
            return self.models[model_id]
        async with self._model_cache_lock:
            if model_id in self.models:
                return self.models[model_id]
            if 0 < self.max_num_models_per_replica <= len(self.models):
                await self.unload_model_lru()
            self.models[model_id] = await self._func(model_id)
            return self.models[model_id]

    async def unload_model_lru(self) -> None:
        """Pop the least recently used model and await its `__del__`."""
        _, model = self.models.popitem(last=False)
        if hasattr(model, "__del__"):
            await model.__del__()


class DeviceSlots:
    """Lenses on the device, least recently used first, kept by Serve's multiplex LRU.

    Every eviction runs under the wrapper's own lock and through its `unload_model_lru`, so
    Serve's model counts, unload metrics and routing information stay true, and a request
    for a lens being evicted waits for the eviction and then loads it again.
    """

    def __init__(self, load: LoadLens, max_lenses: int, *, in_serve: bool) -> None:
        self._load = load
        self._in_serve = in_serve
        self._local: LocalMultiplexer | None = None
        self._serve_fn: Any = None
        self._get: Callable[[str], Awaitable[ResidentLens]]
        self._build(max_lenses)

    def _build(self, max_lenses: int) -> None:
        async def load(lens_id: str) -> ResidentLens:
            return await self._load(lens_id)

        if self._in_serve:
            # STYLE §1: the limit comes from config. Serve keeps its wrapper on the function
            # it decorates (created at the first call): a closure, because a bound method
            # takes no attributes (Ray Serve LLM does the same in LLMServer).
            self._get = serve.multiplexed(max_num_models_per_replica=max_lenses)(load)
            self._serve_fn = load
        else:
            self._local = LocalMultiplexer(load, max_lenses)
            self._get = self._local.load_model

    def _wrapper(self) -> Any | None:
        if self._local is not None:
            return self._local
        return getattr(self._serve_fn, SERVE_WRAPPER_ATTR, None)

    async def get(self, lens_id: str) -> ResidentLens:
        """Return the lens on the device, loading it through Serve (which counts it)."""
        return await self._get(lens_id)

    def resident(self) -> list[ResidentLens]:
        """Lenses on the device, least recently used first."""
        wrapper = self._wrapper()
        return list(wrapper.models.values()) if wrapper is not None else []

    def __contains__(self, lens_id: object) -> bool:
        wrapper = self._wrapper()
        return wrapper is not None and lens_id in wrapper.models

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the multiplex lock: no load or eviction runs meanwhile."""
        wrapper = self._wrapper()
        if wrapper is None:
            yield
            return
        async with wrapper._model_cache_lock:
            yield

    def is_locked(self) -> bool:
        """Tell whether a load or an eviction holds the multiplex lock now."""
        wrapper = self._wrapper()
        return wrapper is not None and wrapper._model_cache_lock.locked()

    async def evict_lru(self) -> None:
        """Evict the least recently used lens. The caller holds the lock (a load does)."""
        wrapper = self._wrapper()
        if wrapper is not None and wrapper.models:
            await wrapper.unload_model_lru()
            wrapper._push_multiplexed_replica_info = True

    async def evict_chosen(self, lens_ids: list[str]) -> list[str]:
        """Evict these lenses (each if still resident). The caller holds the lock.

        Each is moved to the LRU end first, so Serve's own `unload_model_lru` evicts it.
        """
        wrapper = self._wrapper()
        evicted = []
        for lens_id in lens_ids:
            if wrapper is None or lens_id not in wrapper.models:
                continue
            wrapper.models.move_to_end(lens_id, last=False)
            await self.evict_lru()
            evicted.append(lens_id)
        return evicted

    async def resize(self, max_lenses: int) -> None:
        """Change the LRU size; evict least recently used lenses beyond it, under the lock."""
        wrapper = self._wrapper()
        if wrapper is None:
            self._build(max_lenses)  # no lens yet: nothing to keep
            return
        # NOTE: Serve's wrapper evicts one model per load when full, so shrinking it needs
        # the extra evictions here; its lock keeps loads out meanwhile.
        wrapper.max_num_models_per_replica = max_lenses
        async with self.locked():
            while len(wrapper.models) > max_lenses:
                await self.evict_lru()
