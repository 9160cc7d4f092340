"""3D labelled volume -> 2D slices with one binary mask per connected component per class.

Used by the SA-Med2D converter and, without writing files, by training that slices volumes on the fly.
Axes are named as in SA-Med2D file names: ``x``, ``y``, ``z`` = array axes 0, 1, 2 of the volume as
MONAI ``LoadImage`` (ITK reader) returns it, ``[C, x, y, z]``; a slice is ``[C, H, W]`` with the two
remaining axes in order (``z`` slice: H = x, W = y).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage

from ..io import LoadMedicalImage
from ..transforms.checks import describe, require_finite

__all__ = [
    "AXES",
    "MIN_COMPONENT_FRACTION",
    "InstanceMask",
    "LabelledSlice",
    "check_same_grid",
    "load_labelled_volume",
    "take_slice",
    "instance_masks",
    "iter_labelled_slices",
]

#: SA-Med2D axis name -> spatial axis of a ``[C, x, y, z]`` volume.
AXES = {"x": 0, "y": 1, "z": 2}

#: SA-Med2D drops components under 100 px at 256 x 256, i.e. 0.153 % of the slice area.
MIN_COMPONENT_FRACTION = 100 / 256**2

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class InstanceMask:
    """One connected component of one class on a slice."""

    class_id: int
    instance: int
    mask: np.ndarray  # bool [H, W]


@dataclass
class LabelledSlice:
    """A slice with foreground: the image ``[C, H, W]``, its kept instance masks, and how many were dropped."""

    axis: str
    index: int
    image: torch.Tensor
    masks: list[InstanceMask]
    dropped: int


def _axis(axis: str) -> int:
    if axis not in AXES:
        raise ValueError(f"slicing axis {axis!r}: expected one of {sorted(AXES)}")
    return AXES[axis]


def check_same_grid(image, label, image_name: str = "image", label_name: str = "label", atol: float = 1e-3) -> None:
    """Raise ValueError naming both files unless ``label`` has the image's shape and affine (within ``atol`` mm)."""
    if tuple(image.shape[1:]) != tuple(label.shape[1:]):
        raise ValueError(
            f"{label_name}: label grid {tuple(label.shape[1:])} differs from image grid {tuple(image.shape[1:])} "
            f"of {image_name}; expected the same voxel grid"
        )
    image_affine, label_affine = getattr(image, "affine", None), getattr(label, "affine", None)
    if image_affine is not None and label_affine is not None:
        if not np.allclose(np.asarray(image_affine), np.asarray(label_affine), atol=atol):
            raise ValueError(
                f"{label_name}: label affine differs from the affine of {image_name} (spacing, origin or direction); "
                f"expected the same voxel grid\nimage:\n{np.asarray(image_affine)}\nlabel:\n{np.asarray(label_affine)}"
            )


def load_labelled_volume(
    image_path: str | os.PathLike, label_path: str | os.PathLike, loader: LoadMedicalImage | None = None
):
    """Load a 3D image and its label map ``[1, x, y, z]``, checking grid, finiteness and integer class ids."""
    loader = loader or LoadMedicalImage()
    image, label = loader(image_path), loader(label_path)
    for volume, path in ((image, image_path), (label, label_path)):
        if volume.ndim != 4:
            raise ValueError(f"{os.fspath(path)}: {volume.ndim - 1}D image; expected a 3D volume")
        require_finite(volume, os.fspath(path))
    check_same_grid(image, label, os.fspath(image_path), os.fspath(label_path))
    values = torch.unique(label)
    if (values < 0).any() or not torch.equal(values, torch.round(values)):
        shown = values[:10].tolist()
        raise ValueError(f"{os.fspath(label_path)}: label values {shown}...; expected integer class ids >= 0")
    return image, label


def take_slice(volume: torch.Tensor, axis: str, index: int) -> torch.Tensor:
    """The ``[C, H, W]`` slice ``index`` along ``axis`` of a ``[C, x, y, z]`` volume.

    A MetaTensor keeps its metadata (file name, DICOM tags) plus ``slice_axis`` / ``slice_index``;
    its affine maps the slice's (row, column) to world space (third column = slice normal).
    """
    a = _axis(axis)
    size = volume.shape[1 + a]
    if not 0 <= index < size:
        raise ValueError(f"{describe(volume)}: slice {index} along {axis!r} is outside 0..{size - 1}")
    selector = [slice(None)] * 4
    selector[1 + a] = index
    if not isinstance(volume, MetaTensor):
        return volume[tuple(selector)]
    affine = torch.as_tensor(volume.affine, dtype=torch.float64)
    kept = [i for i in range(3) if i != a]
    slice_affine = torch.eye(4, dtype=torch.float64)
    slice_affine[:3, :3] = affine[:3, kept + [a]]
    slice_affine[:3, 3] = affine[:3, 3] + affine[:3, a] * index
    meta = {k: v for k, v in volume.meta.items() if k not in ("affine", "original_affine", "spatial_shape", "spacing")}
    meta.update(slice_axis=axis, slice_index=int(index), spatial_shape=np.array(volume.shape[1:])[kept])
    if "spacing" in volume.meta:
        meta["spacing"] = np.asarray(volume.meta["spacing"])[kept]
    return MetaTensor(volume.as_tensor()[tuple(selector)], affine=slice_affine, meta=meta)


def instance_masks(label2d, min_fraction: float = MIN_COMPONENT_FRACTION) -> tuple[list[InstanceMask], int]:
    """Split a 2D label map into one mask per 8-connected component per class.

    Components smaller than ``min_fraction`` of the slice area are dropped (SA-Med2D's rule);
    returns the kept masks (instances numbered from 0 per class, in raster order) and the number dropped.
    """
    labels = np.asarray(label2d.detach().cpu() if isinstance(label2d, torch.Tensor) else label2d)
    while labels.ndim > 2 and labels.shape[0] == 1:
        labels = labels[0]
    labels = np.rint(labels).astype(np.int64)
    min_area = min_fraction * labels.size
    kept, dropped = [], 0
    for class_id in np.unique(labels[labels > 0]):
        components, count = ndimage.label(labels == class_id, structure=_EIGHT_CONNECTED)
        areas = np.bincount(components.ravel(), minlength=count + 1)
        instance = 0
        for component in range(1, count + 1):
            if areas[component] < min_area:
                dropped += 1
                continue
            kept.append(InstanceMask(int(class_id), instance, components == component))
            instance += 1
    return kept, dropped


def iter_labelled_slices(
    image: torch.Tensor,
    label: torch.Tensor,
    axes: Sequence[str] = ("z",),
    min_fraction: float = MIN_COMPONENT_FRACTION,
) -> Iterator[LabelledSlice]:
    """Yield every slice with label foreground along each axis, with its instance masks.

    A slice whose components were all too small comes with ``masks == []`` and ``dropped > 0``, so
    callers can count it rather than lose it silently.
    """
    check_same_grid(image, label, describe(image), describe(label))
    axis_ids = [_axis(axis) for axis in axes]
    raw = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
    foreground = raw.gt(0).any(dim=0)
    for axis, a in zip(axes, axis_ids):
        present = foreground.sum(dim=tuple(i for i in range(3) if i != a)) > 0
        for index in torch.nonzero(present).flatten().tolist():
            masks, dropped = instance_masks(take_slice(label, axis, index), min_fraction)
            yield LabelledSlice(axis, index, take_slice(image, axis, index), masks, dropped)
