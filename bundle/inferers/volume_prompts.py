"""Voxel prompts for volume inference: validation against the image and grouping by slice.

Coordinates are voxel indices of the array as MONAI ``LoadImage`` returns it (no reorientation), inclusive:
a 3D box ``[i0, j0, k0, i1, j1, k1]``, a slice box ``[i0, j0, i1, j1]`` (the two in-plane array axes in array order)
on slice ``slice_index`` of the chosen axis, clicks ``[i, j, k]`` with labels 1 (foreground) / 0 (background).
A 2D image (``LoadImage`` reads it ``[x, y]``, column first) takes a box ``[x0, y0, x1, y1]`` (SAM's XYXY) and
clicks ``[x, y]``.

A foreground click on a slice beyond a 3D box's slice range joins the object: the range grows to that slice (the
inferer grows a slice's box in-plane, ``grow_box``). A background click there is an error (nothing is segmented
there). Slices with background clicks only correct what propagation brings to them.

Every check raises ``ValueError`` naming the value and what was expected, before any inference or output.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

PROMPT_KEYS = ("box", "slice_box", "slice_index", "points", "point_labels")


@dataclass
class SlicePrompt:
    """Prompts on one slice in in-plane voxel coordinates ``(a, b)`` (the two array axes other than the slice axis).

    ``mask`` is an existing mask of the object on this slice (bool ``[A, B]``, the slice grid), ``mask_logits`` the
    decoder's own low-res logits ``[m, m]`` of an earlier pass (network frame); the inferer feeds one of them to the
    decoder as ``mask_inputs`` when its ``mask_inputs`` switch is on (``mask_logits`` first).
    """

    box: tuple[int, int, int, int] | None = None  # a0, b0, a1, b1 inclusive
    points: list[tuple[int, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    mask: np.ndarray | None = None
    mask_logits: Any = None  # torch.Tensor [m, m]


@dataclass
class PromptPlan:
    """Where inference starts: explicit prompts per slice index, and whether to propagate beyond them."""

    seeds: dict[int, SlicePrompt]
    propagate: bool
    axis: int  # non-negative array axis (of the spatial shape) the slices are taken along
    num_slices: int
    #: clicks alone: the slice of the first foreground click, where the object starts; the clicks on other slices
    #: correct what propagation from it brings there
    anchor: int | None = None

    @property
    def seed_range(self) -> tuple[int, int]:
        return min(self.seeds), max(self.seeds)


def is_whole_number(value: Any) -> bool:
    """True for ints and integral floats (a voxel index given as 12 or 12.0), False for bools."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and float(value).is_integer()


def _int_list(name: str, value: Any, length: int | None = None) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not hasattr(value, "tolist"):
        raise ValueError(f"{name} must be a list of integer voxel indices, got {value!r}")
    values = list(value.tolist() if hasattr(value, "tolist") else value)
    if length is not None and len(values) != length:
        raise ValueError(f"{name} must have {length} integer voxel indices, got {len(values)}: {values!r}")
    if not all(is_whole_number(v) for v in values):
        raise ValueError(f"{name} must hold integer voxel indices, got {values!r}")
    return [int(v) for v in values]


def normalize_axis(axis: int | None, ndim: int) -> int:
    """Array axis (negative allowed, ``None``: the last) as a non-negative index of a ``ndim``-D spatial shape."""
    if axis is None:
        return ndim - 1
    if not is_whole_number(axis) or not -ndim <= int(axis) < ndim:
        raise ValueError(f"axis must be an integer in [{-ndim}, {ndim - 1}] for a {ndim}D image, got {axis!r}")
    return int(axis) % ndim


def plan_prompts(
    spatial_shape: Sequence[int],
    box: Sequence[int] | None = None,
    slice_box: Sequence[int] | None = None,
    slice_index: int | None = None,
    points: Sequence[Sequence[int]] | None = None,
    point_labels: Sequence[int] | None = None,
    axis: int | None = None,
    source: str = "",
) -> PromptPlan:
    """Validate voxel prompts against ``spatial_shape`` and group them by slice along ``axis``.

    A 2D shape ``(X, Y)`` (column first) is handled as ``(X, Y, 1)`` with slices along the last axis and takes 2D
    prompts only: a box ``[x0, y0, x1, y1]`` and clicks ``[x, y]``.
    ``source`` (e.g. the file name) is put in front of error messages.
    """
    where = f"{source}: " if source else ""
    shape = [int(s) for s in spatial_shape]
    is_2d = len(shape) == 2
    if len(shape) not in (2, 3):
        raise ValueError(f"{where}expected a 2D or 3D image, got spatial shape {tuple(shape)}")
    try:
        return _plan(shape, is_2d, box, slice_box, slice_index, points, point_labels, axis)
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None


def _plan(shape, is_2d, box, slice_box, slice_index, points, point_labels, axis) -> PromptPlan:
    if is_2d:  # one slice: the axis setting does not apply
        if box is not None and len(list(box)) == 6:
            raise ValueError(
                f"a 3D box {list(box)} was given for a 2D image of size {tuple(shape)} (x, y); give a 2D box "
                "[x0, y0, x1, y1]"
            )
        if slice_box is not None or slice_index is not None:
            raise ValueError("slice_box / slice_index apply to volumes; for a 2D image give box [x0, y0, x1, y1]")
        shape3 = shape + [1]
        box3 = None
        if box is not None:
            b = _int_list("box", box, 4)
            for n, name in enumerate("xy"):
                if b[n] > b[n + 2]:
                    raise ValueError(
                        f"box {b} is inverted along {name}: {b[n]} > {b[n + 2]} (expected [x0, y0, x1, y1] with "
                        "x0 <= x1, y0 <= y1)"
                    )
                for v in (b[n], b[n + 2]):
                    if not 0 <= v < shape[n]:
                        raise ValueError(
                            f"box {b} lies outside the image: {name}={v} not in [0, {shape[n] - 1}] (image size "
                            f"{shape[0]} x {shape[1]}, x then y); a 2D box is [x0, y0, x1, y1], column first"
                        )
            box3 = [b[0], b[1], 0, b[2], b[3], 0]
        pts3 = None
        if points is not None:
            pts3 = []
            for n, p in enumerate(_as_list("points", points)):
                xy = _int_list(f"points[{n}]", p, 2)
                for d, name in enumerate("xy"):
                    if not 0 <= xy[d] < shape[d]:
                        raise ValueError(
                            f"click {xy} lies outside the image: {name}={xy[d]} not in [0, {shape[d] - 1}] (image "
                            f"size {shape[0]} x {shape[1]}, x then y); a 2D click is [x, y], column first"
                        )
                pts3.append(xy + [0])
        plan = _plan(shape3, False, box3, None, None, pts3, point_labels, 2)
        plan.propagate = False
        return plan

    axis = normalize_axis(axis, 3)
    in_plane = [d for d in range(3) if d != axis]
    names = "ijk"
    has_box, has_slice_box, has_points = box is not None, slice_box is not None, points is not None
    if has_box and has_slice_box:
        raise ValueError("give either box (3D) or slice_box with slice_index, not both")
    if has_slice_box != (slice_index is not None):
        raise ValueError("slice_box [i0, j0, i1, j1] and slice_index k must be given together")
    if point_labels is not None and points is None:
        raise ValueError(f"point_labels {point_labels!r} were given without points")
    if not (has_box or has_slice_box or has_points):
        raise ValueError(
            "no prompt given: give box [i0,j0,k0,i1,j1,k1], slice_box [i0,j0,i1,j1] with slice_index, or points with point_labels"
        )

    def check_inside(label: str, index: list[int]) -> None:
        for d, v in enumerate(index):
            if not 0 <= v < shape[d]:
                raise ValueError(
                    f"{label} {index} lies outside the image: index {names[d]}={v} not in [0, {shape[d] - 1}] "
                    f"(image shape {tuple(shape)})"
                )

    seeds: dict[int, SlicePrompt] = {}
    propagate = True
    box_range = None
    if has_box:
        if len(list(box)) == 4:
            raise ValueError(
                f"box {list(box)} has 4 values but the image is 3D {tuple(shape)}; give [i0, j0, k0, i1, j1, k1], "
                "or slice_box [i0, j0, i1, j1] with slice_index"
            )
        b = _int_list("box", box, 6)
        lo, hi = b[:3], b[3:]
        for d in range(3):
            if lo[d] > hi[d]:
                raise ValueError(
                    f"box {b} is inverted along {names[d]}: {lo[d]} > {hi[d]} (expected [i0, j0, k0, i1, j1, k1], i0 <= i1 ...)"
                )
        check_inside("box corner", lo)
        check_inside("box corner", hi)
        plane_box = (lo[in_plane[0]], lo[in_plane[1]], hi[in_plane[0]], hi[in_plane[1]])
        box_range = (lo[axis], hi[axis])
        for k in range(lo[axis], hi[axis] + 1):
            seeds[k] = SlicePrompt(box=plane_box)
        propagate = False
    if has_slice_box:
        sb = _int_list("slice_box", slice_box, 4)
        if not is_whole_number(slice_index):
            raise ValueError(f"slice_index must be an integer, got {slice_index!r}")
        k = int(slice_index)
        if not 0 <= k < shape[axis]:
            raise ValueError(
                f"slice_index {k} lies outside the image: not in [0, {shape[axis] - 1}] along axis {axis} (shape {tuple(shape)})"
            )
        for n in range(2):
            if sb[n] > sb[n + 2]:
                raise ValueError(
                    f"slice_box {sb} is inverted: {sb[n]} > {sb[n + 2]} (expected [i0, j0, i1, j1] with i0 <= i1, j0 <= j1)"
                )
            d = in_plane[n]
            for v in (sb[n], sb[n + 2]):
                if not 0 <= v < shape[d]:
                    raise ValueError(
                        f"slice_box {sb} lies outside the slice: {v} not in [0, {shape[d] - 1}] along array axis {d} "
                        f"(image shape {tuple(shape)}, slices along axis {axis})"
                    )
        seeds[k] = SlicePrompt(box=tuple(sb))
    if has_points:
        pts = [_int_list(f"points[{n}]", p, 3) for n, p in enumerate(_as_list("points", points))]
        if not pts:
            raise ValueError("points is empty")
        if point_labels is None:
            raise ValueError(
                f"points {pts} were given without point_labels (one label per point: 1 foreground, 0 background)"
            )
        labels = _int_list("point_labels", point_labels)
        if len(labels) != len(pts):
            raise ValueError(f"{len(pts)} points but {len(labels)} point_labels; give one label per point")
        if any(v not in (0, 1) for v in labels):
            raise ValueError(f"point_labels must be 1 (foreground) or 0 (background), got {labels}")
        for p, label in zip(pts, labels):
            check_inside("click", p)
            k = p[axis]
            if box_range is not None and not box_range[0] <= k <= box_range[1]:
                if label == 0:
                    raise ValueError(
                        f"background click {p} lies outside the box's slice range {list(box_range)} along axis "
                        f"{axis}: nothing is segmented there to remove"
                    )
                # a foreground click beyond the box joins the object: the box's slice range grows to its slice
                for j in range(min(k, box_range[0]), max(k, box_range[1]) + 1):
                    seeds.setdefault(j, SlicePrompt(box=plane_box))
                box_range = (min(k, box_range[0]), max(k, box_range[1]))
        for p, label in zip(pts, labels):
            seed = seeds.setdefault(p[axis], SlicePrompt())
            seed.points.append((p[in_plane[0]], p[in_plane[1]]))
            seed.labels.append(label)
        if not any(seed.box is not None or 1 in seed.labels for seed in seeds.values()):
            raise ValueError("only background clicks: add a foreground click (label 1) or a box")
    anchor = None
    if has_points and not (has_box or has_slice_box):
        anchor = next(p[axis] for p, label in zip(pts, labels) if label == 1)
    return PromptPlan(
        seeds=dict(sorted(seeds.items())), propagate=propagate, axis=axis, num_slices=shape[axis], anchor=anchor
    )


def _as_list(name: str, value: Any) -> list:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of voxel indices like [[i, j, k], ...], got {value!r}")
    value = list(value)
    if value and is_whole_number(value[0]):  # a single point given flat
        value = [value]
    return value
