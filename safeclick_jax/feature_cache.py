"""Per-slice image features of one volume, computed once and kept in host memory.

Tracking a slice needs its image-encoder outputs (the stride-16 features, the decoder's two
high-resolution levels, SafeClick's intermediate block); the vision position encoding is the same
for every slice and is kept once. Entries hold exactly what the encoder returned (float32 for an
fp32 model: parity with SAM 2 needs the features unrounded), as numpy arrays, evicted least
recently used when the budget is exceeded. Every object of a session reads the same entries, so a
correction and its re-propagation run only the tracking steps.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import jax


def available_host_bytes() -> int:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class FeatureCache:
    """encode(t) -> pytree of device arrays for slice t; `shared` names the keys that are equal
    for every slice (stored once)."""

    def __init__(self, encode, num_slices: int, bytes_per_slice: int, budget_bytes: int, shared=("pos",)):
        if budget_bytes < bytes_per_slice:
            raise ValueError(
                f"feature cache budget {budget_bytes} bytes is smaller than one slice ({bytes_per_slice} bytes)"
            )
        self.encode, self.num_slices = encode, num_slices
        self.bytes_per_slice, self.budget_bytes = bytes_per_slice, budget_bytes
        self.shared_keys = tuple(shared)
        self._entries: OrderedDict[int, dict] = OrderedDict()
        self._shared: dict | None = None
        self.hits = self.misses = self.evictions = 0

    @property
    def capacity(self) -> int:
        return min(self.num_slices, self.budget_bytes // self.bytes_per_slice)

    def get(self, t: int) -> dict:
        """Slice t's features as device arrays (encoded on a miss)."""
        entry = self._entries.get(t)
        if entry is None:
            self.misses += 1
            feats = self.encode(t)
            host = jax.device_get(feats)
            if self._shared is None:
                self._shared = {k: feats[k] for k in self.shared_keys if k in feats}
            entry = {k: v for k, v in host.items() if k not in self.shared_keys}
            self._entries[t] = entry
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self.evictions += 1
            return feats
        self.hits += 1
        self._entries.move_to_end(t)
        return {**jax.tree.map(jax.numpy.asarray, entry), **self._shared}

    def info(self) -> dict:
        return {
            "bytes_per_slice": self.bytes_per_slice,
            "budget_bytes": self.budget_bytes,
            "capacity_slices": self.capacity,
            "cached_slices": len(self._entries),
            "cached_bytes": len(self._entries) * self.bytes_per_slice,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }
