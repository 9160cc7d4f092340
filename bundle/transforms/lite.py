"""LiteMedSAM's input scaling: each network-frame image min-max scaled to [0, 1], padding left at 0.

LiteMedSAM (the bundle's default ``tiny_vit`` weights) was trained on [0, 1] images, not on SAM's pixel-normalised
ones. Its pipeline, composed from the bundle's transforms:

1. `ModalityNormalize(d)` (``bundle.transforms.intensity``): CT window width 400 / level 40 (preset
   ``"soft_tissue"``), MR/PET 0.5-99.5 percentiles of the foreground voxels, each mapped to [0, 255]; photographic
   and 2D display images kept in [0, 255]. Normalise a volume before slicing it, as LiteMedSAM does.
2. `ToNetworkFrame(d)` (``bundle.transforms.frame``): longest side to 256, zero padding bottom/right.
3. `LiteMedSAMScale(d)` (this module): min-max of the resized image (the unpadded part of the frame) to [0, 1].

where the ViT-B (SAM / SAM-UNet) pipeline uses `SAMPixelNormalize(d)` before step 2 instead of step 3.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor

from .frame import NETWORK_SIZE, frame_shape

__all__ = ["LiteMedSAMScale", "LiteMedSAMScaled"]


class LiteMedSAMScale(Transform):
    """``[C, S, S]`` network-frame image -> the resized image min-max scaled to [0, 1], the padding 0.

    Args:
        size: side ``S`` of the network frame.
        eps: smallest range divided by (a constant image becomes 0, as in LiteMedSAM's ``clip(max - min, 1e-8)``).

    ``original_hw`` (the image's size before `ToNetworkFrame`) gives the unpadded region ``frame_shape(original_hw)``;
    without it the whole array is scaled: a frame, or an image ``[C, H, W]`` or volume ``[C, H, W, D]`` at its own
    resolution (windowed inference cuts network windows from it afterwards).
    """

    def __init__(self, size: int = NETWORK_SIZE, eps: float = 1e-8) -> None:
        self.size = size
        self.eps = eps

    def __call__(self, img, original_hw: Sequence[int] | None = None):
        img = convert_to_tensor(img, dtype=torch.float32, track_meta=True)
        if original_hw is None:
            if img.ndim not in (3, 4):
                raise ValueError(
                    f"LiteMedSAMScale: shape {tuple(img.shape)}; expected a channel-first [C, H, W] or [C, H, W, D] array"
                )
            return self._scale(img)
        if img.ndim != 3 or tuple(img.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"LiteMedSAMScale: shape {tuple(img.shape)}; expected a [C, {self.size}, {self.size}] frame"
            )
        height, width = frame_shape(original_hw, self.size)
        out = torch.zeros_like(img)
        out[:, :height, :width] = self._scale(img[:, :height, :width])
        return out

    def _scale(self, region: torch.Tensor) -> torch.Tensor:
        low, high = region.min(), region.max()
        return (region - low) / torch.clamp(high - low, min=self.eps)


class LiteMedSAMScaled(MapTransform):
    """Dictionary version of `LiteMedSAMScale`; the original ``(H, W)`` is read from ``data[original_hw_key]``
    (written by `ToNetworkFramed`) when present; ``original_hw_key=None`` scales the whole array."""

    def __init__(
        self,
        keys: KeysCollection,
        size: int = NETWORK_SIZE,
        original_hw_key: str | None = "original_hw",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scale = LiteMedSAMScale(size)
        self.original_hw_key = original_hw_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        original_hw = d.get(self.original_hw_key) if self.original_hw_key else None
        for key in self.key_iterator(d):
            d[key] = self.scale(d[key], original_hw)
        return d
