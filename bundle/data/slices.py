"""Datalists of labelled 3D volumes sliced in memory: training and evaluation on volumes without writing PNG files.

Each volume is normalised for its modality once, then every slice with foreground becomes one item with one mask per
connected component per class (SA-Med2D's rules, :mod:`bundle.data.volumes`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..transforms import ModalityNormalize, resolve_modality
from .checks import check_files
from .volumes import MIN_COMPONENT_FRACTION, iter_labelled_slices, load_labelled_volume

__all__ = ["volume_slice_datalist", "load_volume_datalist"]

logger = logging.getLogger(__name__)


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
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such volume datalist (a JSON list of {{'image', 'label'}})")
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "image" in e and "label" in e for e in entries):
        raise ValueError(f"{path}: expected a JSON list of {{'image': path, 'label': path}} objects")
    return volume_slice_datalist(entries, base_dir=os.path.dirname(os.path.abspath(path)), **kwargs)
