"""Existing masks as prompts: a label map (or a 2D mask) turned into per-object, per-slice prompts.

A mask prompt is an integer label map on the image's voxel grid: 0 background, every other value one object (a 2D
display mask saved 0/255, as SA-Med2D and this bundle write them, is one object, label 1). For an object,
:func:`mask_plan` gives one seed per slice the object covers: the object's bounding box on that slice (inclusive voxel
indices, the box a user would draw around it) and its mask there (:class:`SlicePrompt` ``box`` and ``mask``). The
inferer decodes those slices with the box (and, when its ``mask_inputs`` switch is on, the mask as the decoder's
low-res ``mask_inputs``, see :meth:`SliceFrame.mask_to_low_res`) and propagates from them to the slices beyond.

:func:`check_label_map` (and :func:`load_mask_prompt`, which reads a file with the image's own loader) refuse, before
any inference, a mask of another size than the image, one that is not a label map (non-integer, negative, non-finite
or multi-channel values), an empty one, and labels above 65535 (the uint16 range label maps are written in).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from bundle.io import is_display_file, load_image, strip_extensions

from .volume_prompts import PromptPlan, SlicePrompt

#: the largest label value (label maps are written as uint16 when a label is over 255)
MAX_LABEL = 65535
#: the most objects one mask prompt may hold (a mask with more distinct values is an image, not a label map)
MAX_MASK_OBJECTS = 255


def check_label_map(
    values, spatial_shape: Sequence[int], source: str = "mask", allow_empty: bool = False
) -> np.ndarray:
    """``values`` (the mask's array, the image's spatial shape) as a uint16 label map; ``ValueError`` naming
    ``source`` unless it is a label map of integers in [0, 65535] of exactly ``spatial_shape``, and not empty (unless
    ``allow_empty``: a ground truth may be)."""
    array = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values)
    shape = tuple(int(s) for s in spatial_shape)
    if tuple(array.shape) != shape:
        raise ValueError(
            f"{source}: mask of size {list(array.shape)} for an image of size {list(shape)}; a mask prompt must lie "
            "on the image's voxel grid (same size, as LoadImage reads both)"
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{source}: mask of dtype {array.dtype}; expected integer labels")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{source}: the mask holds NaN or infinite values; expected integer labels")
        fractional = array[array != np.round(array)]
        if fractional.size:
            raise ValueError(
                f"{source}: not a label map: values such as {float(fractional.flat[0]):.4g} are not whole numbers "
                "(a mask prompt holds 0 for background and 1, 2, ... for objects, not probabilities or intensities)"
            )
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0:
        raise ValueError(f"{source}: not a label map: negative value {low} (labels are 0 for background, 1, 2, ...)")
    if high > MAX_LABEL:
        raise ValueError(
            f"{source}: label {int(high)} is over {MAX_LABEL}, the largest label a uint16 label map can hold"
        )
    if high == 0 and not allow_empty:
        raise ValueError(f"{source}: the mask is empty (no non-zero voxel): nothing to take a prompt from")
    return array.astype(np.uint16)


def label_values(label_map: np.ndarray, source: str = "mask") -> list[int]:
    """The object labels (sorted non-zero values) of a label map; at most :data:`MAX_MASK_OBJECTS`."""
    values = [int(v) for v in np.unique(label_map) if v != 0]
    if len(values) > MAX_MASK_OBJECTS:
        raise ValueError(
            f"{source}: {len(values)} distinct labels; at most {MAX_MASK_OBJECTS} objects per mask prompt (is this an "
            "image rather than a label map?)"
        )
    return values


def load_mask_prompt(
    path: str | os.PathLike,
    spatial_shape: Sequence[int],
    slice_index: int | None = None,
    axis: int = -1,
    allow_empty: bool = False,
) -> np.ndarray:
    """Read a mask prompt file (or a ground truth, ``allow_empty``) as a uint16 label map of ``spatial_shape``.

    The file is read as the image is (:func:`bundle.io.load_image`), so both arrays index the same voxels. A 2D display
    mask whose only non-zero value is 255 is one object (label 1). A 2D mask for a volume is placed on slice
    ``slice_index`` along ``axis`` (the slice it was drawn on) and needs it.
    """
    path = os.fspath(path)
    shape = tuple(int(s) for s in spatial_shape)
    image = load_image(path)
    data = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if data.shape[0] > 1:
        if not all(np.array_equal(data[0], c) for c in data[1:]):
            raise ValueError(f"{path}: {data.shape[0]} channels that differ; a mask prompt is a one-channel label map")
        data = data[:1]
    array = data[0]
    if is_display_file(path) and set(np.unique(array).tolist()) == {0.0, 255.0}:
        array = (array > 0).astype(np.uint8)  # a 0/255 picture of one object
    if array.ndim == 3 and array.shape[-1] == 1 and (len(shape) == 2 or shape[-1] != 1):
        array = array[..., 0]  # a single-slice volume file holding a 2D mask
    if len(shape) == 3 and array.ndim == 2:
        axis = int(axis) % 3
        in_plane = tuple(s for d, s in enumerate(shape) if d != axis)
        if slice_index is None:
            raise ValueError(
                f"{path}: a 2D mask of size {list(array.shape)} for a 3D image of size {list(shape)}: give the "
                "slice_index it was drawn on (or a label volume of the image's size)"
            )
        if tuple(array.shape) != in_plane:
            raise ValueError(
                f"{path}: 2D mask of size {list(array.shape)}; slices of the image along axis {axis} have size "
                f"{list(in_plane)}"
            )
        if not 0 <= int(slice_index) < shape[axis]:
            raise ValueError(f"{path}: slice_index {slice_index} not in [0, {shape[axis] - 1}] along axis {axis}")
        volume = np.zeros(shape, dtype=array.dtype)
        np.moveaxis(volume, axis, -1)[..., int(slice_index)] = array
        array = volume
    elif slice_index is not None:
        raise ValueError(
            f"{path}: slice_index applies to a 2D mask of a volume; this mask has size {list(array.shape)}"
        )
    return check_label_map(array, shape, path, allow_empty)


def mask_label_names(path: str | os.PathLike) -> dict[int, str]:
    """Label value -> name from the JSON sidecar beside a label map (``<name>.json``, as inference writes it)."""
    path = Path(path)
    sidecar = path.parent / f"{strip_extensions(path)}.json"
    if not sidecar.is_file():
        return {}
    try:
        names = json.loads(sidecar.read_text()).get("label_names", {})
        return {int(value): str(name) for name, value in names.items()}
    except (ValueError, AttributeError, TypeError) as error:
        raise ValueError(f"{sidecar}: not a label sidecar with label_names {{name: value}} ({error})") from None


def mask_plan(
    label_slices: np.ndarray, axis: int, value: int | None = None, propagate: bool = True, source: str = "mask"
) -> PromptPlan:
    """Prompts for one object of a label map in the inferer's slice layout.

    Args:
        label_slices: ``[A, B, K]`` label map with the slices along the last axis (``to_slices(label[None], axis)``).
        axis: the image's slice axis (the plan's ``axis``).
        value: the object's label; ``None``: every non-zero voxel is the object.
        propagate: carry the object beyond the slices it covers.

    Returns a :class:`PromptPlan` with one seed per covered slice ``k``: ``SlicePrompt(box=(a0, b0, a1, b1),
    mask=[A, B] bool)``, the inclusive bounding box and the mask of the object on slice ``k``.
    """
    foreground = label_slices > 0 if value is None else label_slices == value
    covered = np.flatnonzero(foreground.any(axis=(0, 1)))
    if not covered.size:
        raise ValueError(f"{source}: no voxel of label {value}" if value is not None else f"{source}: empty mask")
    seeds = {}
    for k in covered.tolist():
        mask = np.ascontiguousarray(foreground[..., k])
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        seeds[k] = SlicePrompt(box=(int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])), mask=mask)
    return PromptPlan(seeds=seeds, propagate=propagate, axis=axis, num_slices=int(label_slices.shape[-1]))


def label_map_plans(
    label_slices: np.ndarray, axis: int, propagate: bool = True, source: str = "mask"
) -> dict[int, PromptPlan]:
    """:func:`mask_plan` for every object of a label map: label value -> its plan."""
    return {v: mask_plan(label_slices, axis, v, propagate, source) for v in label_values(label_slices, source)}
