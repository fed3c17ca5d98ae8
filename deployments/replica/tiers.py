"""The lens objects a replica keeps: a device lens with its users, the host tier, donors.

Below `replica/residency.py` on the data path (DESIGN §Serving shape, "Tiers"); the device
LRU itself is Serve's (`replica/multiplex.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from lenscore import Base, Lens

log = logging.getLogger(__name__)


class ResidentLens:
    """One lens on the device, as handed to Serve's multiplexer, with a count of its users.

    NOTE: Serve's multiplexer tears down an evicted model even while a request still uses
    it: it awaits the model's `__del__` (a coroutine function is awaited) right after popping
    it from its LRU. Here `__del__` is an instance attribute bound to `_evict`, which waits
    for the last user and then hands the lens to `on_evict` (the move to the host tier).
    Being an instance attribute, Python's garbage collector (which looks `__del__` up on the
    class) never runs it as a finalizer.
    """

    def __init__(
        self,
        lens: Lens,
        *,
        kind: str,
        on_evict: Callable[[ResidentLens], Awaitable[None]],
    ) -> None:
        self.lens = lens
        self.lens_id: str = lens.lens_id
        self.nbytes: int = lens.nbytes
        self.kind = kind  # switch kind of the load that put it on the device
        self.users = 0
        self.evicted = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_evict = on_evict
        self.__del__ = self._evict

    def try_acquire(self) -> bool:
        """Count one more user; False when the lens is already being evicted."""
        if self.evicted:
            return False
        self.users += 1
        self._idle.clear()
        return True

    def hold(self) -> None:
        """Count one more user for a caller that already holds the lens (eviction waits)."""
        self.users += 1
        self._idle.clear()

    def release(self) -> None:
        """Count one user less (call on the event loop thread)."""
        self.users -= 1
        if self.users <= 0:
            self.users = 0
            self._idle.set()

    async def _evict(self) -> None:
        self.evicted = True
        await self._idle.wait()
        await self._on_evict(self)


class HostTier:
    """Lenses evicted from the device, kept in host RAM; least recently used dropped first.

    Bounded by bytes (`host_cache_gb`), which include `reserved_bytes`: lenses a prefetch is
    reading into this tier (`replica/prefetch.py`). A lens dropped from here is back to "disk
    only".
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.reserved_bytes = 0
        self._lenses: OrderedDict[str, Lens] = OrderedDict()
        self._kept: Counter[str] = Counter()  # lens id -> requests about to take it

    @property
    def nbytes(self) -> int:
        """Bytes of the lens tensors held here."""
        return sum(lens.nbytes for lens in self._lenses.values())

    def lens_ids(self) -> list[str]:
        """Lens ids held, least recently used first."""
        return list(self._lenses)

    def __contains__(self, lens_id: object) -> bool:
        return lens_id in self._lenses

    def touch(self, lens_id: str) -> bool:
        """Mark the lens most recently used; False if it is not here."""
        if lens_id not in self._lenses:
            return False
        self._lenses.move_to_end(lens_id)
        return True

    @contextlib.contextmanager
    def keeping(self, lens_id: str) -> Iterator[None]:
        """Never drop this lens to make room meanwhile (a request is about to take it).

        NOTE: Serve evicts its LRU lens before it calls the loader, and that eviction puts a
        lens here; without this the put could push out the very lens being switched to.
        """
        self._kept[lens_id] += 1
        try:
            yield
        finally:
            self._kept[lens_id] -= 1
            if self._kept[lens_id] <= 0:
                del self._kept[lens_id]

    def get(self, lens_id: str) -> Lens | None:
        """Return the lens held under this id (its LRU place unchanged), or None."""
        return self._lenses.get(lens_id)

    def sizes(self) -> dict[str, int]:
        """Lens id -> bytes, least recently used first."""
        return {lens_id: lens.nbytes for lens_id, lens in self._lenses.items()}

    def put(self, lens: Lens) -> list[str]:
        """Keep `lens` (already on the host); return the ids dropped to make room."""
        self._lenses.pop(lens.lens_id, None)
        if lens.nbytes + self.reserved_bytes > self.capacity_bytes:
            return [lens.lens_id]
        self._lenses[lens.lens_id] = lens
        return self._shrink()

    def take(self, lens_id: str) -> Lens | None:
        """Remove and return the lens (it is going back to the device), or None."""
        return self._lenses.pop(lens_id, None)

    def drop_where(self, predicate: Callable[[Lens], bool]) -> list[str]:
        """Drop every lens for which `predicate` is true; return their ids."""
        dropped = [lens_id for lens_id, lens in self._lenses.items() if predicate(lens)]
        for lens_id in dropped:
            del self._lenses[lens_id]
        return dropped

    def resize(self, capacity_bytes: int) -> list[str]:
        """Change the capacity; return the ids dropped to fit."""
        self.capacity_bytes = capacity_bytes
        return self._shrink()

    def _shrink(self) -> list[str]:
        dropped = []
        while self._lenses and self.nbytes + self.reserved_bytes > self.capacity_bytes:
            # Least recently used first, but not a lens a request is about to take.
            lens_id = next((x for x in self._lenses if x not in self._kept), None)
            if lens_id is None:
                break  # only kept lenses: they leave for the device next
            del self._lenses[lens_id]
            dropped.append(lens_id)
        return dropped


class DonorCache:
    """Donor models by path, loaded once each and shared by every lens naming them.

    Least recently used first out, but a donor that a device-resident lens still reads is
    never dropped (the lens holds a reference, so dropping it would free nothing): with
    more such donors than `max_donors`, the cache runs over its limit and logs it.
    """

    def __init__(
        self,
        max_donors: int,
        load: Callable[[Path], Awaitable[Base]],
        on_drop: Callable[[Path, Base], None],
    ) -> None:
        self.max_donors = max_donors
        self.loads = 0
        self._load = load
        self._on_drop = on_drop
        self._donors: OrderedDict[Path, Base] = OrderedDict()
        self._bytes: dict[Path, int] = {}  # Base.nbytes walks every parameter: once per load
        self._loading: dict[Path, asyncio.Future[Base]] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the donor models held."""
        return sum(self._bytes[path] for path in self._donors)

    def paths(self) -> list[Path]:
        """Donor paths held, least recently used first."""
        return list(self._donors)

    async def get(self, path: Path, *, pinned: set[Path]) -> Base:
        """Return the donor at `path`, loading it once even under concurrent calls.

        Args:
            path: donor model directory.
            pinned: donor paths that device-resident lenses read; never dropped.

        """
        if path in self._donors:
            self._donors.move_to_end(path)
            return self._donors[path]
        if path in self._loading:
            return await asyncio.shield(self._loading[path])
        future: asyncio.Future[Base] = asyncio.get_running_loop().create_future()
        self._loading[path] = future
        try:
            self.trim(self.max_donors - 1, pinned=pinned)
            donor = await self._load(path)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so a lone failure logs no warning
            raise
        finally:
            self._loading.pop(path, None)
        self.loads += 1
        self._donors[path] = donor
        self._bytes[path] = donor.nbytes
        future.set_result(donor)
        return donor

    def trim(self, keep: int, *, pinned: set[Path]) -> None:
        """Drop least recently used donors, not pinned ones, until at most `keep` remain."""
        for path in list(self._donors):
            if len(self._donors) <= max(keep, 0):
                break
            if path in pinned:
                continue
            self._bytes.pop(path, None)
            self._on_drop(path, self._donors.pop(path))
        if len(self._donors) > max(keep, 0):
            log.warning(
                "donor cache holds %d donors (limit %d): resident lenses still read them",
                len(self._donors),
                self.max_donors,
            )
