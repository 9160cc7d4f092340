"""A small memory-bounded LRU cache of per-slice image embeddings.

The volume inferer encodes every slice once and reuses its features for every prompt on it (a 3D box, propagation,
extra clicks); the MONAI Label server keeps one cache per loaded network so interactive clicks on an already-seen slice
only run the prompt encoder and mask decoder.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch

Features = dict[str, torch.Tensor]


def features_nbytes(features: Features) -> int:
    """Bytes held by the tensors of one features dict."""
    return sum(t.numel() * t.element_size() for t in features.values())


class EmbeddingCache:
    """Least-recently-used cache of SAMUNet features, bounded in bytes (and optionally in entries).

    Keys are hashable tuples, by convention ``(image_id, axis, slice_index)``; values are the features dict that
    :meth:`bundle.networks.SAMUNet.encode` returns for ONE image, without the batch dimension (``[C, h, w]`` each).
    One cache belongs to one network: features of different networks or preprocessing must not share ``image_id``\\ s.

    Args:
        max_bytes: memory budget for all cached tensors; the least recently used entries are evicted beyond it.
            An entry larger than the whole budget is not stored. ``0`` disables caching.
        max_items: optional cap on the number of entries.
        storage_device: where cached tensors live (``None``: where they were computed, e.g. on the GPU).

    Thread-safe (a lock guards every access), so a server may share it between request threads.
    """

    def __init__(
        self, max_bytes: int = 1 << 30, max_items: int | None = None, storage_device: str | torch.device | None = None
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if max_items is not None and max_items < 0:
            raise ValueError(f"max_items must be >= 0 or None, got {max_items}")
        self.max_bytes = int(max_bytes)
        self.max_items = max_items
        self.storage_device = None if storage_device is None else torch.device(storage_device)
        self._entries: OrderedDict[Hashable, tuple[Features, int]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------------------------------------------------ access
    def get(self, key: Hashable) -> Features | None:
        """Return the cached features for ``key`` (marking them most recently used) or ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, features: Features) -> bool:
        """Store ``features`` (one image, no batch dimension) under ``key``; returns whether they were kept."""
        stored = {
            name: t.detach().to(self.storage_device) if self.storage_device else t.detach()
            for name, t in features.items()
        }
        size = features_nbytes(stored)
        with self._lock:
            if key in self._entries:
                self._nbytes -= self._entries.pop(key)[1]
            if size > self.max_bytes or self.max_items == 0:
                return False
            self._entries[key] = (stored, size)
            self._nbytes += size
            self._evict()
            return key in self._entries

    def _evict(self) -> None:
        while self._entries and (
            self._nbytes > self.max_bytes or (self.max_items is not None and len(self._entries) > self.max_items)
        ):
            _, (_, size) = self._entries.popitem(last=False)
            self._nbytes -= size

    def invalidate(self, image_id: Hashable) -> int:
        """Drop every entry whose key starts with ``image_id`` (e.g. when an image is edited or closed)."""
        with self._lock:
            doomed = [k for k in self._entries if isinstance(k, tuple) and k and k[0] == image_id]
            for key in doomed:
                self._nbytes -= self._entries.pop(key)[1]
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    # -------------------------------------------------------------------------------------------------------- inspection
    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._nbytes

    def __repr__(self) -> str:
        return (
            f"EmbeddingCache({len(self)} entries, {self._nbytes / 2**20:.1f} of {self.max_bytes / 2**20:.1f} MiB, "
            f"hits={self.hits}, misses={self.misses})"
        )
