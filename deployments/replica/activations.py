"""The activation cache of a group replica: one base (or donor) forward per text and layer.

Between `GroupServer` (its scheduler, or the unbatched path) and lenscore: `analysis_steps`
reads activations through `ActivationCache.read`, so every lens of the group that explains
the same text at the same layer of the same activation model shares one forward, and a
repeated text needs none (DESIGN §Serving shape, "Activation cache").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from deployments.replica.status import ActivationCacheStats
from lenscore.analyze import capture_activations

# Key: (id of the activation model, its path, layer, token ids as bytes). The object id
# keeps a reloaded donor from reading its predecessor's entries; the path keeps two models
# that happen to reuse one id apart.
_Key = tuple[int, str, int, bytes]


class ActivationCache:
    """Activations [T, d] per (activation model, layer, token ids), LRU by bytes.

    Entries stay on the activation model's device. Lookups come from the scheduler's worker
    thread and, with batching off, from several request threads: a lock guards the map.
    Two threads missing the same key at once may both compute it (the second result wins).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._reported = (0, 0)  # (hits, misses) already handed to `take_counts`
        self._entries: OrderedDict[_Key, torch.Tensor] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def read(self, model: Any, ids: torch.Tensor, layer: int) -> torch.Tensor:
        """Activations after block `layer` of `model` at every position of `ids` [1, T].

        Returns [T, d] on the model's device; callers must not modify it (it is shared).
        """
        key = (id(model), str(model.path), layer, ids.cpu().numpy().tobytes())
        with self._lock:
            acts = self._entries.get(key)
            if acts is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        if acts is not None:
            return acts
        acts = capture_activations(model, ids, layer)  # [T, d]
        self._put(key, acts)
        return acts

    def _put(self, key: _Key, acts: torch.Tensor) -> None:
        size = _entry_bytes(key, acts)
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = acts
            self._nbytes += size
            self._trim()

    def _trim(self) -> None:
        while self._nbytes > self.max_bytes and self._entries:
            key, acts = self._entries.popitem(last=False)
            self._nbytes -= _entry_bytes(key, acts)

    def resize(self, max_bytes: int) -> None:
        """Apply a new size; least recently used entries go first."""
        with self._lock:
            self.max_bytes = max_bytes
            self._trim()

    def clear(self) -> None:
        """Drop every entry (counters stay)."""
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def take_counts(self) -> tuple[int, int]:
        """Hits and misses since the last call (for counters recorded on the event loop)."""
        with self._lock:
            hits, misses = self.hits, self.misses
        last_hits, last_misses = self._reported
        self._reported = (hits, misses)
        return hits - last_hits, misses - last_misses

    def stats(self) -> ActivationCacheStats:
        """Counters and size for the replica status."""
        return ActivationCacheStats(
            hits=self.hits,
            misses=self.misses,
            entries=len(self._entries),
            cached_bytes=self._nbytes,
            max_bytes=self.max_bytes,
        )

    @property
    def nbytes(self) -> int:
        """Bytes held: activations and keys."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)


def _entry_bytes(key: _Key, acts: torch.Tensor) -> int:
    return acts.numel() * acts.element_size() + len(key[3])
