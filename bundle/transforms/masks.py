"""Choosing k of an image's instance masks (SAM-Med2D trains on k masks per image, drawn each epoch)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

__all__ = ["sample_masks", "RandSampleMasksd"]


def sample_masks(masks: Sequence, k: int, rng: np.random.RandomState | int | None = None, replace: bool = True) -> list:
    """``k`` items of ``masks``: with replacement as SAM-Med2D (``random.choices``), or without when enough exist."""
    if k < 1:
        raise ValueError(f"k {k!r}: expected at least one mask per image")
    if not masks:
        raise ValueError("no masks to sample from")
    state = rng if isinstance(rng, np.random.RandomState) else np.random.RandomState(rng)
    if replace or len(masks) < k:
        indices = state.randint(0, len(masks), size=k)
    else:
        indices = state.choice(len(masks), size=k, replace=False)
    return [masks[i] for i in indices]


class RandSampleMasksd(Randomizable, MapTransform):
    """Replace the list of mask paths in each key by ``k`` sampled ones (before loading); seeded by MONAI."""

    def __init__(
        self, keys: KeysCollection = "label", k: int = 5, replace: bool = True, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.k, self.replace = k, replace

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            masks = [d[key]] if isinstance(d[key], str) else list(d[key])
            if not masks:
                raise ValueError(f"key {key!r} of image {d.get('image')!r}: empty mask list, nothing to sample")
            d[key] = sample_masks(masks, self.k, self.R, self.replace)
        return d
