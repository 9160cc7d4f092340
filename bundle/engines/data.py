"""Dataset glue the training / evaluation configs need on top of `bundle.data` and `bundle.transforms`.

- `cached_dataset`: one config entry, three cache choices (``"memory"`` CacheDataset, ``"persistent"``
  PersistentDataset, ``"none"`` Dataset), so ``train#dataset#data`` stays a plain id (MONAI FL overrides it).
- `RandSelectMasksd`: k random instance masks of an already loaded ``[K, H, W]`` label, so the loading can be cached
  and the masks still change every epoch (`bundle.transforms.RandSampleMasksd` samples paths, before loading).
- `volume_slice_datalist`: a datalist of 3D volumes -> in-memory 2D slice items (one mask per connected component
  per class, SA-Med2D's rules) without writing files, through `bundle.data.iter_labelled_slices`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import MapTransform, Randomizable

from bundle.data import MIN_COMPONENT_FRACTION, iter_labelled_slices, load_labelled_volume
from bundle.transforms import ModalityNormalize, resolve_modality, sample_masks

from .handlers import check_files

__all__ = ["CACHE_CHOICES", "cached_dataset", "RandSelectMasksd", "volume_slice_datalist", "load_volume_datalist"]

logger = logging.getLogger(__name__)

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


class RandSelectMasksd(Randomizable, MapTransform):
    """Keep ``k`` random channels (instance masks) of each ``[K, H, W]`` key, with replacement as SAM-Med2D (so every
    item has exactly k masks and batches collate), or without replacement when ``replace=False`` and K >= k."""

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
            if masks.shape[0] < 1:
                raise ValueError(f"key {key!r}: no masks to sample from (shape {tuple(masks.shape)})")
            index = sample_masks(list(range(masks.shape[0])), self.k, self.R, self.replace)
            d[key] = masks[torch.as_tensor(index)] if isinstance(masks, torch.Tensor) else masks[np.asarray(index)]
        return d


def volume_slice_datalist(
    datalist: Sequence[Mapping],
    axes: Sequence[str] = ("z",),
    min_fraction: float = MIN_COMPONENT_FRACTION,
    default_modality: str | None = None,
    window: str | Sequence[float] = "soft_tissue",
    percentiles: Sequence[float] = (0.5, 99.5),
    base_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Slice labelled volumes ``[{"image": path, "label": path, "modality"?: name}]`` into 2D items, in memory.

    Each volume is normalised for its modality once (CT window / MR-PET percentiles, `ModalityNormalize`, 0..255, one
    channel), then every slice along ``axes`` with foreground becomes ``{"image": [1, H, W], "label": [K, H, W]
    (0/1), "modality", "case", "spacing": (row, column) mm, "image_id", "original_hw"}``. Slices whose components are
    all below ``min_fraction`` are dropped and counted in the log. Every file is checked before any is loaded:
    a missing one raises FileNotFoundError naming it.
    """
    check_files(datalist, ("image", "label"), base_dir, what="volume datalist")
    normalizer = ModalityNormalize(
        default_modality=default_modality, window=window, percentiles=percentiles, out_channels=1
    )
    items: list[dict] = []
    for entry in datalist:
        image_path, label_path = (
            os.path.join(base_dir, p) if base_dir is not None and not os.path.isabs(p) else p
            for p in (entry["image"], entry["label"])
        )
        image, label = load_labelled_volume(image_path, label_path)
        modality = resolve_modality(
            image.meta, field=entry.get("modality"), default=default_modality, source=image_path
        )
        grey = normalizer.normalize(image, modality, image_path)
        case = entry.get("case") or os.path.basename(os.fspath(image_path)).split(".")[0]
        spacing = np.asarray(image.meta.get("spacing", np.ones(3)), dtype=float).reshape(-1)[:3]
        kept = dropped_slices = 0
        for s in iter_labelled_slices(grey, label, axes, min_fraction):
            if not s.masks:
                dropped_slices += 1
                continue
            in_plane = [float(spacing[i]) for i in range(3) if i != "xyz".index(s.axis)]
            masks = torch.as_tensor(np.stack([m.mask for m in s.masks]).astype(np.float32))
            items.append(
                {
                    "image": torch.as_tensor(np.asarray(s.image), dtype=torch.float32),
                    "label": masks,
                    "modality": modality.value,
                    "case": case,
                    "spacing": torch.tensor(in_plane),
                    "image_id": f"{case}--{s.axis}_{s.index:04d}",
                }
            )
            kept += 1
        logger.info(
            f"{image_path}: {kept} slices with masks, {dropped_slices} slices whose components were all too small"
        )
    if not items:
        raise ValueError("volume datalist: no slice with a labelled component; nothing to train or evaluate on")
    return items


def load_volume_datalist(path: str | os.PathLike, **kwargs) -> list[dict]:
    """`volume_slice_datalist` of a JSON list of ``{"image", "label", "modality"?}``; relative paths are taken
    against the JSON file's folder. A missing JSON file raises FileNotFoundError naming it."""
    import json

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such volume datalist (a JSON list of {{'image', 'label'}})")
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "image" in e and "label" in e for e in entries):
        raise ValueError(f"{path}: expected a JSON list of {{'image': path, 'label': path}} objects")
    return volume_slice_datalist(entries, base_dir=os.path.dirname(os.path.abspath(path)), **kwargs)
