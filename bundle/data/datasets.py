"""One config entry, three cache choices for a training or evaluation dataset.

``"memory"`` (MONAI ``CacheDataset``), ``"persistent"`` (``PersistentDataset`` in ``cache_dir``) or ``"none"``
(``Dataset``), so ``train#dataset#data`` stays a plain config id (MONAI FL overrides it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from monai.data import CacheDataset, Dataset, PersistentDataset

__all__ = ["CACHE_CHOICES", "cached_dataset"]

CACHE_CHOICES = ("memory", "persistent", "none")


def cached_dataset(
    data: Sequence,
    transform,
    cache: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    cache_rate: float = 1.0,
    num_workers: int | None = 0,
    progress: bool = False,
):
    """``CacheDataset`` (``cache="memory"``), ``PersistentDataset`` (``"persistent"``, in ``cache_dir``) or ``Dataset``.

    Both caches keep the deterministic transforms before the first random one.
    """
    if cache == "memory":
        return CacheDataset(
            data=data, transform=transform, cache_rate=cache_rate, num_workers=num_workers, progress=progress
        )
    if cache == "persistent":
        if cache_dir is None:
            raise ValueError("cache='persistent' needs a cache_dir")
        os.makedirs(cache_dir, exist_ok=True)
        return PersistentDataset(data=data, transform=transform, cache_dir=cache_dir)
    if cache == "none":
        return Dataset(data=data, transform=transform)
    raise ValueError(f"cache {cache!r}: expected one of {CACHE_CHOICES}")
