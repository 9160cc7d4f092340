"""Choosing k of an image's instance masks (SAM-Med2D trains on k masks per image, drawn each epoch)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
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
    """Draw ``k`` of an image's instance masks, anew at every call (seeded by MONAI's ``set_random_state``).

    A key may hold mask file paths (a list, or one path; sampled before loading) or loaded masks ``[K, H, W]``
    (channels sampled, so the loading can be cached and the masks still change every epoch). Sampling is with
    replacement, as SAM-Med2D, so every item has exactly ``k`` masks and batches collate; ``replace=False`` draws
    without replacement where there are at least ``k``.
    """

    def __init__(
        self, keys: KeysCollection = "label", k: int = 5, replace: bool = True, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if k < 1:
            raise ValueError(f"k {k!r}: expected at least one mask per image")
        self.k, self.replace = int(k), bool(replace)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            masks = d[key]
            if isinstance(masks, (str, list, tuple)):
                paths = [masks] if isinstance(masks, str) else list(masks)
                if not paths:
                    raise ValueError(f"key {key!r} of image {d.get('image')!r}: empty mask list, nothing to sample")
                d[key] = sample_masks(paths, self.k, self.R, self.replace)
                continue
            if masks.shape[0] < 1:
                raise ValueError(f"key {key!r}: no masks to sample from (shape {tuple(masks.shape)})")
            index = sample_masks(list(range(masks.shape[0])), self.k, self.R, self.replace)
            d[key] = masks[torch.as_tensor(index)] if isinstance(masks, torch.Tensor) else masks[np.asarray(index)]
        return d
