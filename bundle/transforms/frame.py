"""The network frame: longest side resized to ``size`` (256), zero padding at the bottom/right; and back.

A 2D ``[C, H, W]`` image of size ``(H, W)`` is resized to `frame_shape` ``(h, w)`` (MONAI `Resize`,
``size_mode="longest"``, so ``round(H * size / max(H, W))``) and padded at the end to
``size x size`` (MONAI `SpatialPad`, ``method="end"``). Apply it after `SAMPixelNormalize` so
the padding is 0 in normalised space, as in SAM.

Coordinates are pixel coordinates ``x`` (column, last array axis) then ``y`` (row). They scale by
``w / W`` and ``h / H`` (as SAM's ``ResizeLongestSide.apply_coords``); the padding adds no offset.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, MapTransform, Resize, SpatialPad, Transform
from monai.utils import ensure_tuple_rep

from .checks import describe

__all__ = [
    "NETWORK_SIZE",
    "frame_shape",
    "scale_box_to_frame",
    "box_from_frame",
    "scale_points_to_frame",
    "points_from_frame",
    "ToNetworkFrame",
    "ToNetworkFramed",
    "FromNetworkFrame",
    "FromNetworkFramed",
]

#: Side of the square network input.
NETWORK_SIZE = 256


def frame_shape(original_hw: Sequence[int], size: int = NETWORK_SIZE) -> tuple[int, int]:
    """Height and width of an ``original_hw`` image after resizing its longest side to ``size``."""
    height, width = (int(v) for v in original_hw)
    if height < 1 or width < 1:
        raise ValueError(f"original_hw {tuple(original_hw)!r}: expected positive height and width")
    scale = size / max(height, width)
    return int(round(height * scale)), int(round(width * scale))


def _xy_factors(original_hw: Sequence[int], size: int) -> tuple[float, float]:
    height, width = (int(v) for v in original_hw)
    frame_h, frame_w = frame_shape(original_hw, size)
    return frame_w / width, frame_h / height


def _scale(coords, factors_xy: tuple[float, float], name: str):
    """Multiply x (even positions of the last axis) and y (odd positions) by the given factors."""
    last = np.shape(coords)[-1] if np.ndim(coords) else 0
    if last not in (2, 4):
        raise ValueError(f"{name}: last axis has {last} values; expected x, y (points) or x0, y0, x1, y1 (boxes)")
    factors = [factors_xy[i % 2] for i in range(last)]
    if isinstance(coords, torch.Tensor):
        return coords.to(torch.float32) * torch.as_tensor(factors, dtype=torch.float32, device=coords.device)
    return np.asarray(coords, dtype=np.float64) * np.asarray(factors)


def scale_box_to_frame(box_xyxy, original_hw: Sequence[int], size: int = NETWORK_SIZE):
    """Boxes ``[..., 4]`` (x0, y0, x1, y1) in original pixel coordinates -> network frame coordinates."""
    return _scale(box_xyxy, _xy_factors(original_hw, size), "box")


def box_from_frame(box_xyxy, original_hw: Sequence[int], size: int = NETWORK_SIZE):
    """Boxes ``[..., 4]`` in network frame coordinates -> original pixel coordinates."""
    fx, fy = _xy_factors(original_hw, size)
    return _scale(box_xyxy, (1 / fx, 1 / fy), "box")


def scale_points_to_frame(points_xy, original_hw: Sequence[int], size: int = NETWORK_SIZE):
    """Points ``[..., 2]`` (x, y) in original pixel coordinates -> network frame coordinates."""
    return _scale(points_xy, _xy_factors(original_hw, size), "points")


def points_from_frame(points_xy, original_hw: Sequence[int], size: int = NETWORK_SIZE):
    """Points ``[..., 2]`` in network frame coordinates -> original pixel coordinates."""
    fx, fy = _xy_factors(original_hw, size)
    return _scale(points_xy, (1 / fx, 1 / fy), "points")


def _require_2d(img, source: str) -> tuple[int, int]:
    if img.ndim != 3:
        raise ValueError(f"{source}: shape {tuple(img.shape)}; expected a 2D channel-first [C, H, W] image")
    return int(img.shape[1]), int(img.shape[2])


class ToNetworkFrame(InvertibleTransform, Transform):
    """``[C, H, W]`` -> ``[C, size, size]``: longest side to ``size``, pad bottom/right with ``pad_value``.

    Invertible through MONAI's applied-operations trace (`inverse`, `Invertd`); `FromNetworkFrame`
    does the same mapping from an explicit original size. ``mode`` is any MONAI `Resize` mode:
    ``"bilinear"`` for images, ``"nearest-exact"`` for masks (torch's ``"nearest"`` shifts by half a
    pixel), ``"area"`` for large downsampling factors.
    MONAI's Gaussian ``anti_aliasing`` is not used: its zero-padded smoothing darkens the image border.
    """

    def __init__(self, size: int = NETWORK_SIZE, mode: str = "bilinear", pad_value: float = 0.0) -> None:
        self.size = size
        self.mode = mode
        self.resize = Resize(size, size_mode="longest", mode=mode)
        self.pad = SpatialPad((size, size), method="end", value=pad_value)

    def __call__(self, img, mode: str | None = None):
        _require_2d(img, describe(img))
        return self.pad(self.resize(img, mode=mode or self.mode))

    def inverse(self, data):
        return self.resize.inverse(self.pad.inverse(data))


class ToNetworkFramed(MapTransform, InvertibleTransform):
    """Dictionary version of `ToNetworkFrame`; ``mode`` per key (e.g. ``("bilinear", "nearest-exact")``).

    All keys must share one ``(H, W)``, which is stored in ``data[original_hw_key]``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        size: int = NETWORK_SIZE,
        mode: str | Sequence[str] = "bilinear",
        pad_value: float = 0.0,
        original_hw_key: str = "original_hw",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.frame = ToNetworkFrame(size, pad_value=pad_value)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.original_hw_key = original_hw_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        shapes = {key: _require_2d(d[key], describe(d[key], key)) for key in self.key_iterator(d)}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"ToNetworkFramed: keys have different H, W {shapes}; expected one grid")
        if shapes:
            d[self.original_hw_key] = next(iter(shapes.values()))
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.frame(d[key], mode=mode)
        return d

    def inverse(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.frame.inverse(d[key])
        return d


class FromNetworkFrame(Transform):
    """``[C, size, size]`` network-frame logits or masks -> ``[C, H, W]`` on the original grid.

    Crops the bottom/right padding and resizes back (``mode="bilinear"`` for logits/probabilities,
    then threshold; ``"nearest-exact"`` for masks). Works for any input resolution, e.g. 64x64 low-res
    logits with ``size=64``.
    """

    def __init__(self, size: int = NETWORK_SIZE, mode: str = "bilinear") -> None:
        self.size = size
        self.mode = mode

    def __call__(self, img, original_hw: Sequence[int], mode: str | None = None):
        height, width = (int(v) for v in original_hw)
        if tuple(img.shape[-2:]) != (self.size, self.size) or img.ndim != 3:
            raise ValueError(
                f"{describe(img)}: shape {tuple(img.shape)}; "
                f"expected [C, {self.size}, {self.size}] in the network frame"
            )
        frame_h, frame_w = frame_shape((height, width), self.size)
        resize = Resize((height, width), mode=mode or self.mode)
        with resize.trace_transform(False):
            return resize(img[:, :frame_h, :frame_w])


class FromNetworkFramed(MapTransform):
    """Dictionary version of `FromNetworkFrame`; the original ``(H, W)`` is read from ``data[original_hw_key]``."""

    def __init__(
        self,
        keys: KeysCollection,
        size: int = NETWORK_SIZE,
        mode: str | Sequence[str] = "bilinear",
        original_hw_key: str = "original_hw",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.restore = FromNetworkFrame(size)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.original_hw_key = original_hw_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.original_hw_key not in d:
            raise ValueError(f"FromNetworkFramed: key {self.original_hw_key!r} (original H, W) missing from the data")
        original_hw = [int(v) for v in d[self.original_hw_key]]
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.restore(d[key], original_hw, mode=mode)
        return d
