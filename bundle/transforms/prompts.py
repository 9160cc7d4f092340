"""Prompt sampling from masks, as the SAM-UNet / SAM-Med2D / MedSAM protocols sample them.

Coordinates are pixel indices of the mask array: ``x`` = column (last axis), ``y`` = row. Boxes are
XYXY and inclusive (``x1`` is the last foreground column), as MedSAM builds them. Connected
components use full connectivity (8-neighbour in 2D, 26 in 3D), as ``skimage.measure.label``.
Random functions take a ``numpy.random.RandomState`` (MONAI's ``self.R``) or an int seed.

Empty masks raise ValueError naming the mask; the dictionary transforms name key and file.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from scipy import ndimage

from .checks import describe

__all__ = [
    "largest_component",
    "box_from_mask",
    "sample_points",
    "corrective_click",
    "box3d_from_mask",
    "protocol_click",
    "RandBoxPromptd",
    "RandPointPromptd",
    "RandCorrectiveClickd",
    "Box3DPromptd",
]

BOX_MODES = ("sam_unet", "medsam")
CLICK_MODES = ("random", "center")


def _rng(rng: np.random.RandomState | int | None) -> np.random.RandomState:
    return rng if isinstance(rng, np.random.RandomState) else np.random.RandomState(rng)


def _binary(mask, ndim: int, name: str, threshold: float = 0.5) -> np.ndarray:
    """Mask as a bool numpy array of ``ndim`` dims; leading singleton (channel) axes are dropped."""
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    while arr.ndim > ndim and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != ndim:
        raise ValueError(f"{name}: mask of shape {tuple(np.shape(mask))}; expected a {ndim}D mask")
    return arr > threshold


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a bool mask (full connectivity; ties -> first in raster order)."""
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _bounds(mask: np.ndarray) -> np.ndarray:
    """Inclusive min / max index per axis: ``[min_0, min_1, ..., max_0, max_1, ...]``."""
    coords = np.nonzero(mask)
    return np.array([c.min() for c in coords] + [c.max() for c in coords], dtype=np.int64)


def box_from_mask(
    mask,
    jitter: int = 0,
    mode: str = "sam_unet",
    rng: np.random.RandomState | int | None = None,
    largest: bool = True,
    name: str | None = None,
) -> np.ndarray:
    """Inclusive XYXY box ``[x0, y0, x1, y1]`` (int64) around a 2D mask's largest component.

    ``jitter`` is the most pixels a coordinate moves:

    - ``"sam_unet"`` (SAM-UNet / SAM-Med2D training): each coordinate moves by a uniform integer
      in ``[-m, m]``, ``m = min(jitter, short side // 2)`` (short side = smaller of x1 - x0, y1 - y0),
      so the box never flips.
    - ``"medsam"``: each side moves outwards by a uniform integer in ``[0, jitter]`` (MedSAM uses
      20 px at 1024, about 5 at 256).

    The box is clipped to the image. ``largest=False`` boxes all foreground (MedSAM's ground-truth box).
    """
    name = name or describe(mask)
    if mode not in BOX_MODES:
        raise ValueError(f"box mode {mode!r}: expected one of {BOX_MODES}")
    if jitter < 0:
        raise ValueError(f"jitter {jitter!r}: expected >= 0 pixels")
    fg = _binary(mask, 2, name)
    if not fg.any():
        raise ValueError(f"{name}: empty mask (no foreground pixel); a box prompt needs foreground")
    y0, x0, y1, x1 = _bounds(largest_component(fg) if largest else fg)
    box = np.array([x0, y0, x1, y1], dtype=np.int64)
    if jitter:
        state = _rng(rng)
        if mode == "sam_unet":
            most = min(jitter, int(min(x1 - x0, y1 - y0)) // 2)
            box += state.randint(-most, most + 1, size=4)
        else:
            box += state.randint(0, jitter + 1, size=4) * np.array([-1, -1, 1, 1])
    height, width = fg.shape
    return np.clip(box, 0, [width - 1, height - 1, width - 1, height - 1])


def sample_points(mask, n: int = 1, rng: np.random.RandomState | int | None = None, name: str | None = None):
    """``n`` point prompts from a 2D mask with SAM-Med2D's mix; returns ``(points [n, 2] xy, labels [n])``.

    One point: a foreground point (label 1). More: ``n // 2`` foreground and ``n - n // 2``
    background points (label 0), each drawn uniformly with replacement, in shuffled order.
    """
    name = name or describe(mask)
    if n < 1:
        raise ValueError(f"n {n!r}: expected at least one point")
    fg = _binary(mask, 2, name)
    n_fg = 1 if n == 1 else n // 2
    n_bg = n - n_fg
    fg_yx, bg_yx = np.argwhere(fg), np.argwhere(~fg)
    if len(fg_yx) == 0:
        raise ValueError(f"{name}: empty mask (no foreground pixel); a point prompt needs foreground")
    if n_bg and len(bg_yx) == 0:
        raise ValueError(f"{name}: mask covers the whole image; {n_bg} background point(s) need background")
    state = _rng(rng)
    chosen = [fg_yx[state.randint(0, len(fg_yx), size=n_fg)]]
    if n_bg:
        chosen.append(bg_yx[state.randint(0, len(bg_yx), size=n_bg)])
    labels = np.concatenate([np.ones(n_fg, np.int64), np.zeros(n_bg, np.int64)])
    order = state.permutation(n)
    return np.concatenate(chosen)[order][:, ::-1].copy(), labels[order]


def corrective_click(
    pred,
    gt,
    rng: np.random.RandomState | int | None = None,
    n: int = 1,
    mode: str = "random",
    threshold: float = 0.5,
    name: str | None = None,
):
    """Next click(s) from the error region of a 2D prediction; returns ``(points [n, 2] xy, labels [n])``.

    A click on a false negative (gt 1, pred 0) is positive (label 1), on a false positive negative
    (label 0). ``"random"``: uniform over the error pixels, with replacement (SAM-Med2D).
    ``"center"``: the error pixel farthest from the error region's border (RITM / deepgrow style;
    deterministic, ``n`` must be 1). ``pred`` and ``gt`` are binarised with ``> threshold``.
    Without any error the clicks are ``(0, 0)`` with label -1, the network's padding label.
    """
    name = name or describe(gt)
    if mode not in CLICK_MODES:
        raise ValueError(f"click mode {mode!r}: expected one of {CLICK_MODES}")
    if n < 1 or (mode == "center" and n != 1):
        raise ValueError(f"n {n!r}: expected n >= 1 (n == 1 for mode 'center')")
    p, g = _binary(pred, 2, f"{name} prediction", threshold), _binary(gt, 2, name, threshold)
    if p.shape != g.shape:
        raise ValueError(f"{name}: prediction shape {p.shape} differs from ground truth shape {g.shape}")
    error = p != g
    if not error.any():
        return np.zeros((n, 2), np.int64), np.full(n, -1, np.int64)
    if mode == "random":
        yx = np.argwhere(error)[_rng(rng).randint(0, int(error.sum()), size=n)]
    else:
        distance = ndimage.distance_transform_edt(np.pad(error, 1))[1:-1, 1:-1]
        yx = np.array([np.unravel_index(int(np.argmax(distance)), error.shape)])
    labels = g[yx[:, 0], yx[:, 1]].astype(np.int64)
    return yx[:, ::-1].copy(), labels


def box3d_from_mask(mask3d, largest: bool = True, name: str | None = None) -> np.ndarray:
    """Inclusive voxel-index box ``[i0, j0, k0, i1, j1, k1]`` (int64) of a 3D mask's largest component."""
    name = name or describe(mask3d)
    fg = _binary(mask3d, 3, name)
    if not fg.any():
        raise ValueError(f"{name}: empty mask (no foreground voxel); a 3D box prompt needs foreground")
    return _bounds(largest_component(fg) if largest else fg)


def protocol_click(pred, truth, spacing=None) -> tuple[tuple[int, ...] | None, int]:
    """The interactive protocol's next click on a 2D or 3D prediction (both ``[*spatial]``, binarised at 0.5).

    The click is the point farthest inside the largest connected error region (full connectivity; distances in
    ``spacing`` units per axis, voxels by default, the image border counting as outside): foreground (label 1)
    on a miss, background (0) on a false positive. With an empty ``pred`` it is the deepest point of the object
    (SAM-Med2D's first point-only click). Returns ``(index, label)``, or ``(None, -1)`` when nothing is wrong.
    """
    truth = np.asarray(truth) > 0.5
    pred = np.asarray(pred) > 0.5
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the ground truth's {truth.shape}")
    error = pred != truth
    if not error.any():
        return None, -1
    region = largest_component(error)
    bounds = _bounds(region)  # the distances inside a region depend only on its bounding box (plus the border)
    crop = tuple(slice(lo, hi + 1) for lo, hi in zip(bounds[: truth.ndim], bounds[truth.ndim :]))
    distance = ndimage.distance_transform_edt(np.pad(region[crop], 1), sampling=spacing)
    inner = np.unravel_index(int(np.argmax(distance[(slice(1, -1),) * truth.ndim])), region[crop].shape)
    index = tuple(int(c.start + v) for c, v in zip(crop, inner))
    return index, int(truth[index])


def _channels(mask, name: str) -> list:
    """Split a ``[K, H, W]`` (or ``[H, W]``) mask into K 2D masks."""
    if mask.ndim == 2:
        return [mask]
    if mask.ndim != 3:
        raise ValueError(f"{name}: mask of shape {tuple(mask.shape)}; expected [K, H, W] with one mask per channel")
    return list(mask)


class RandBoxPromptd(Randomizable, Transform):
    """Box prompts ``[K, 4]`` (float32 XYXY) for the K masks in ``data[label_key]`` (``[K, H, W]``).

    See `box_from_mask`; seed with ``set_random_state``. Test protocol: ``jitter=0``.
    """

    def __init__(
        self,
        label_key: str = "label",
        box_key: str = "box",
        jitter: int = 5,
        mode: str = "sam_unet",
        largest: bool = True,
    ) -> None:
        if mode not in BOX_MODES:
            raise ValueError(f"box mode {mode!r}: expected one of {BOX_MODES}")
        self.label_key, self.box_key = label_key, box_key
        self.jitter, self.mode, self.largest = jitter, mode, largest

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        name = describe(d[self.label_key], self.label_key)
        boxes = [
            box_from_mask(m, self.jitter, self.mode, self.R, self.largest, f"{name} mask {i}")
            for i, m in enumerate(_channels(d[self.label_key], name))
        ]
        d[self.box_key] = torch.as_tensor(np.stack(boxes), dtype=torch.float32)
        return d


class RandPointPromptd(Randomizable, Transform):
    """Point prompts ``[K, n, 2]`` (float32 xy) and labels ``[K, n]`` (int64) for K masks; see `sample_points`."""

    def __init__(
        self, label_key: str = "label", points_key: str = "points", point_labels_key: str = "point_labels", n: int = 1
    ) -> None:
        self.label_key, self.points_key, self.point_labels_key, self.n = label_key, points_key, point_labels_key, n

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        name = describe(d[self.label_key], self.label_key)
        masks = _channels(d[self.label_key], name)
        pairs = [sample_points(m, self.n, self.R, f"{name} mask {i}") for i, m in enumerate(masks)]
        d[self.points_key] = torch.as_tensor(np.stack([p for p, _ in pairs]), dtype=torch.float32)
        d[self.point_labels_key] = torch.as_tensor(np.stack([lab for _, lab in pairs]))
        return d


class RandCorrectiveClickd(Randomizable, Transform):
    """Corrective clicks from ``data[pred_key]`` vs ``data[label_key]`` (both ``[K, H, W]``); see `corrective_click`.

    With ``append=True`` the new clicks are concatenated to existing ``points_key`` / ``point_labels_key``
    (``[K, P, 2]`` / ``[K, P]``), as in SAM-Med2D's iterative training.
    """

    def __init__(
        self,
        pred_key: str = "pred",
        label_key: str = "label",
        points_key: str = "points",
        point_labels_key: str = "point_labels",
        n: int = 1,
        mode: str = "random",
        threshold: float = 0.5,
        append: bool = True,
    ) -> None:
        if mode not in CLICK_MODES:
            raise ValueError(f"click mode {mode!r}: expected one of {CLICK_MODES}")
        self.pred_key, self.label_key = pred_key, label_key
        self.points_key, self.point_labels_key = points_key, point_labels_key
        self.n, self.mode, self.threshold, self.append = n, mode, threshold, append

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        name = describe(d[self.label_key], self.label_key)
        preds, gts = _channels(d[self.pred_key], self.pred_key), _channels(d[self.label_key], name)
        if len(preds) != len(gts):
            raise ValueError(f"{name}: {len(gts)} masks but {len(preds)} predictions in key {self.pred_key!r}")
        pairs = [
            corrective_click(p, g, self.R, self.n, self.mode, self.threshold, f"{name} mask {i}")
            for i, (p, g) in enumerate(zip(preds, gts))
        ]
        points = torch.as_tensor(np.stack([p for p, _ in pairs]), dtype=torch.float32)
        labels = torch.as_tensor(np.stack([lab for _, lab in pairs]))
        if self.append and self.points_key in d:
            points = torch.cat([torch.as_tensor(d[self.points_key], dtype=torch.float32), points], dim=1)
            labels = torch.cat([torch.as_tensor(d[self.point_labels_key], dtype=torch.int64), labels], dim=1)
        d[self.points_key], d[self.point_labels_key] = points, labels
        return d


class Box3DPromptd(Transform):
    """3D box ``[6]`` (int64 inclusive voxel indices) of the mask in ``data[label_key]``; see `box3d_from_mask`."""

    def __init__(self, label_key: str = "label", box_key: str = "box3d", largest: bool = True) -> None:
        self.label_key, self.box_key, self.largest = label_key, box_key, largest

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        name = describe(d[self.label_key], self.label_key)
        d[self.box_key] = torch.as_tensor(box3d_from_mask(d[self.label_key], self.largest, name))
        return d
