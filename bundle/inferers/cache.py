"""Memory-bounded LRU caches: slice embeddings for the inferer, loaded volumes for the MONAI Label server.

The volume inferer encodes every slice once and reuses its features for every prompt on it (a 3D box, propagation,
extra clicks); the MONAI Label server also keeps its loaded, normalised volumes so that a click does not re-read the
file. Both are :class:`MemoryCache`: cachetools' ``LRUCache`` sized in bytes, behind a lock, with hit counts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch
from cachetools import LRUCache

Features = dict[str, torch.Tensor]


def features_nbytes(features: Features) -> int:
    """Bytes held by the tensors of one features dict."""
    return sum(t.numel() * t.element_size() for t in features.values())


class MemoryCache:
    """Least-recently-used cache bounded in bytes (``sizeof(value)`` each) and optionally in entries.

    An entry larger than the whole budget is not stored; ``max_bytes=0`` disables caching. Keys are hashable, by
    convention tuples whose first element names the image (:meth:`invalidate` drops all of an image's entries).
    Thread-safe, so a server may share it between request threads.
    """

    def __init__(self, max_bytes: int, sizeof: Callable[[Any], int], max_items: int | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if max_items is not None and max_items < 0:
            raise ValueError(f"max_items must be >= 0 or None, got {max_items}")
        self.max_bytes = int(max_bytes)
        self.max_items = max_items
        self._entries = LRUCache(maxsize=self.max_bytes, getsizeof=sizeof)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable):
        """The value for ``key`` (marking it most recently used), or ``None``."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def put(self, key: Hashable, value) -> bool:
        """Store ``value`` under ``key``, evicting the least recently used entries; returns whether it was kept."""
        with self._lock:
            self._entries.pop(key, None)
            if self.max_items == 0:
                return False
            try:
                self._entries[key] = value
            except ValueError:  # larger than the whole budget
                return False
            while self.max_items is not None and len(self._entries) > self.max_items:
                self._entries.popitem()
            return key in self._entries

    def invalidate(self, image_id: Hashable) -> int:
        """Drop every entry whose key starts with ``image_id`` (e.g. when an image is edited or closed)."""
        with self._lock:
            doomed = [k for k in self._entries if isinstance(k, tuple) and k and k[0] == image_id]
            for key in doomed:
                del self._entries[key]
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return int(self._entries.currsize)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} entries, {self.nbytes / 2**20:.1f} of {self.max_bytes / 2**20:.1f} MiB, "
            f"hits={self.hits}, misses={self.misses})"
        )


class EmbeddingCache(MemoryCache):
    """:class:`MemoryCache` of SAMUNet features, one image each (``[C, h, w]`` tensors, no batch dimension).

    Keys are by convention ``(image_id, axis, slice_index)``. One cache belongs to one network: features of
    different networks or preprocessing must not share ``image_id``\\ s.

    Args:
        max_bytes: memory budget for all cached tensors.
        max_items: optional cap on the number of entries.
        storage_device: where cached tensors live (``None``: where they were computed, e.g. on the GPU).
    """

    def __init__(
        self,
        max_bytes: int = 1 << 30,
        max_items: int | None = None,
        storage_device: str | torch.device | None = None,
    ) -> None:
        super().__init__(max_bytes, features_nbytes, max_items)
        self.storage_device = None if storage_device is None else torch.device(storage_device)

    def put(self, key: Hashable, features: Features) -> bool:
        device = self.storage_device
        return super().put(
            key, {name: (t.detach().to(device) if device else t.detach()) for name, t in features.items()}
        )
