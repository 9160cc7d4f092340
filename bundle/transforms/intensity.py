"""Modality-specific intensity normalisation to a 3-channel [0, 255] image, and SAM pixel normalisation.

Per modality (`ModalityNormalize`):

- CT: a window (named preset from `CT_WINDOWS` or ``(width, level)``) mapped linearly so that
  ``level - width/2 -> 0`` and ``level + width/2 -> 255``, values outside clipped
  (MONAI `ScaleIntensityRange`).
- MR and PET: clip to the 0.5 and 99.5 percentiles (configurable) of the foreground voxels
  (intensity above ``foreground_threshold``, 0 as in MedSAM / LiteMedSAM; or of all voxels) and
  map that range to [0, 255]. An image without foreground becomes all zeros.
- Photographic modalities (X-ray, ultrasound, endoscopy, dermoscopy, fundus) and any 2D display
  file (PNG/JPG/BMP, e.g. SA-Med2D images, already windowed): values already in [0, 255] are kept,
  others (e.g. 12/16-bit X-ray) are min-max scaled to [0, 255]; grey+alpha keeps grey, RGBA keeps RGB.

Grey results are repeated to ``out_channels`` (3 for the network). Statistics are taken over the
whole array passed in, so normalise a volume before slicing it for volume-consistent slices.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, NormalizeIntensity, NormalizeIntensityd, ScaleIntensityRange, Transform
from monai.utils import convert_to_tensor

from ..io import is_display_file
from .checks import describe, require_finite
from .modality import PHOTOGRAPHIC, Modality, parse_modality, resolve_modality

__all__ = [
    "Modality",
    "Window",
    "CT_WINDOWS",
    "ct_window",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "ModalityNormalize",
    "ModalityNormalized",
    "SAMPixelNormalize",
    "SAMPixelNormalized",
]

#: SAM's pixel mean and std on a [0, 255] RGB image.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class Window(NamedTuple):
    """A CT display window in HU."""

    width: float
    level: float

    @property
    def low(self) -> float:
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        return self.level + self.width / 2


#: Named CT window presets (width, level) in HU.
CT_WINDOWS = {
    "soft_tissue": Window(400, 40),
    "abdomen": Window(400, 40),
    "lung": Window(1500, -600),
    "bone": Window(1800, 400),
    "brain": Window(80, 40),
}


def ct_window(window: str | Sequence[float]) -> Window:
    """A `Window` from a preset name in `CT_WINDOWS` or a ``(width, level)`` pair (width > 0)."""
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(
                f"unknown CT window preset {window!r}; expected one of {sorted(CT_WINDOWS)} or (width, level)"
            )
        return CT_WINDOWS[window]
    if len(window) != 2 or not float(window[0]) > 0:
        raise ValueError(f"CT window {window!r}: expected (width, level) with width > 0")
    return Window(float(window[0]), float(window[1]))


class ModalityNormalize(Transform):
    """Raw channel-first image -> ``out_channels`` x [0, 255] float32, normalised as its modality needs.

    Args:
        modality: modality from the config; overrides every other source.
        default_modality: used when neither the call, the DICOM Modality tag nor an SA-Med2D file name
            gives one. Without it an unknown modality is a ValueError.
        window: CT window, a `CT_WINDOWS` preset name or ``(width, level)``.
        percentiles: lower and upper percentile for MR and PET clipping.
        foreground_only: take MR/PET percentiles over voxels above ``foreground_threshold`` only.
        foreground_threshold: intensity above which a voxel counts as foreground.
        out_channels: 3 (grey repeated, the network input) or 1 (grey images only).

    The resolved modality is written to ``img.meta["modality"]``.
    """

    def __init__(
        self,
        modality: str | None = None,
        default_modality: str | None = None,
        window: str | Sequence[float] = "soft_tissue",
        percentiles: Sequence[float] = (0.5, 99.5),
        foreground_only: bool = True,
        foreground_threshold: float = 0.0,
        out_channels: int = 3,
    ) -> None:
        if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(f"percentiles {percentiles!r}: expected (low, high) with 0 <= low < high <= 100")
        if out_channels not in (1, 3):
            raise ValueError(f"out_channels {out_channels!r}: expected 1 or 3")
        self.modality = modality
        self.default_modality = default_modality
        self.window = ct_window(window)
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        self.foreground_only = foreground_only
        self.foreground_threshold = foreground_threshold
        self.out_channels = out_channels

    def resolve(self, img, modality: str | None = None, source: str | None = None) -> Modality:
        """The modality for ``img``: config, then ``modality`` (a datalist field), then metadata, then default."""
        return resolve_modality(
            getattr(img, "meta", None),
            configured=self.modality,
            field=modality,
            default=self.default_modality,
            source=source or describe(img),
        )

    def __call__(self, img, modality: str | None = None, source: str | None = None) -> torch.Tensor:
        source = source or describe(img)
        return self.normalize(img, self.resolve(img, modality, source), source)

    def normalize(self, img, modality: str | Modality, source: str = "image") -> torch.Tensor:
        """Normalise ``img`` as ``modality`` (no lookup in the metadata)."""
        modality = parse_modality(modality)
        img = convert_to_tensor(img, dtype=torch.float32, track_meta=True)
        require_finite(img, source)
        display = is_display_file(getattr(img, "meta", {}).get("filename_or_obj"))
        if display or modality in PHOTOGRAPHIC:
            out = self._display(img, source)
        elif img.shape[0] != 1:
            channels = img.shape[0]
            raise ValueError(f"{source}: {modality.value} image with {channels} channels; expected one grey channel")
        elif modality == Modality.CT:
            out = ScaleIntensityRange(self.window.low, self.window.high, 0.0, 255.0, clip=True)(img)
        else:
            out = self._percentile_clip(img)
        if self.out_channels == 3 and out.shape[0] == 1:
            out = out.repeat(3, *([1] * (out.ndim - 1)))
        if isinstance(out, MetaTensor):
            out.meta["modality"] = modality.value
        return out

    def _display(self, img: torch.Tensor, source: str) -> torch.Tensor:
        channels = img.shape[0]
        if channels not in (1, 2, 3, 4):
            raise ValueError(f"{source}: {channels} channels; expected grey, grey+alpha, RGB or RGBA")
        img = img[:1] if channels == 2 else img[:3]
        if self.out_channels == 1 and img.shape[0] == 3:
            raise ValueError(f"{source}: RGB image but out_channels=1; use out_channels=3")
        low, high = float(img.min()), float(img.max())
        if low >= 0 and high <= 255:
            return img
        return ScaleIntensityRange(low, high, 0.0, 255.0, clip=True)(img) if high > low else img * 0

    def _percentile_clip(self, img: torch.Tensor) -> torch.Tensor:
        values = img[img > self.foreground_threshold] if self.foreground_only else img.reshape(-1)
        if values.numel() == 0:
            return img * 0
        low, high = (float(v) for v in np.percentile(values.detach().cpu().numpy(), self.percentiles))
        if high > low:
            return ScaleIntensityRange(low, high, 0.0, 255.0, clip=True)(img)
        return (img > low).to(img.dtype) * 255.0


class ModalityNormalized(MapTransform):
    """Dictionary version of `ModalityNormalize`.

    The modality comes from ``modality`` (config), else ``data[modality_key]`` (datalist field),
    else the image metadata (DICOM tag, SA-Med2D file name), else ``default_modality``. The
    resolved name is written back to ``data[modality_key]``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality_key: str = "modality",
        modality: str | None = None,
        default_modality: str | None = None,
        window: str | Sequence[float] = "soft_tissue",
        percentiles: Sequence[float] = (0.5, 99.5),
        foreground_only: bool = True,
        foreground_threshold: float = 0.0,
        out_channels: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality_key = modality_key
        self.normalizer = ModalityNormalize(
            modality, default_modality, window, percentiles, foreground_only, foreground_threshold, out_channels
        )

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            source = describe(d[key], key)
            modality = self.normalizer.resolve(d[key], d.get(self.modality_key), source)
            d[key] = self.normalizer.normalize(d[key], modality, source)
            d[self.modality_key] = modality.value
        return d


class SAMPixelNormalize(NormalizeIntensity):
    """SAM pixel normalisation of a 3-channel [0, 255] image: ``(x - mean) / std`` per channel.

    MONAI `NormalizeIntensity` (channel-wise subtrahend/divisor); the input is not modified.
    """

    def __init__(
        self, mean: Sequence[float] = SAM_PIXEL_MEAN, std: Sequence[float] = SAM_PIXEL_STD, dtype=torch.float32
    ) -> None:
        super().__init__(subtrahend=mean, divisor=std, channel_wise=True, dtype=dtype)

    def __call__(self, img):
        return super().__call__(img.clone() if isinstance(img, torch.Tensor) else np.array(img, copy=True))


class SAMPixelNormalized(NormalizeIntensityd):
    """Dictionary version of `SAMPixelNormalize`."""

    def __init__(
        self,
        keys: KeysCollection,
        mean: Sequence[float] = SAM_PIXEL_MEAN,
        std: Sequence[float] = SAM_PIXEL_STD,
        dtype=torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.normalizer = SAMPixelNormalize(mean, std, dtype)
