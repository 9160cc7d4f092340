"""Reading images through MONAI `LoadImage` with one reader per kind of file and clear errors.

Volumes (NIfTI, NRRD, MHA, DICOM files and DICOM series folders) go through MONAI's ITKReader,
which keeps affine, spacing and, with ``series_meta``, the DICOM tags (``"0008|0060"`` is the
Modality). 2D display images (PNG, JPG, BMP, e.g. SA-Med2D files) go through PILReader with
``reverse_indexing=False`` so the array is ``[C, H, W]`` in the file's row order, as the reference
code reads them. Files read by ITK keep MONAI's ITK axis order ``[C, i, j(, k)]`` (no reorientation).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data import ITKReader, PILReader
from monai.transforms import LoadImage, MapTransform, Transform

__all__ = ["DISPLAY_SUFFIXES", "is_display_file", "LoadMedicalImage", "LoadMedicalImaged"]

#: Suffixes read as 8-bit 2D display images.
DISPLAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def is_display_file(path) -> bool:
    """True for a 2D display image file (PNG/JPG/BMP), whose values are already 8-bit."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(DISPLAY_SUFFIXES)


class LoadMedicalImage(Transform):
    """Load one image (or a list of same-sized masks, stacked as channels) as a channel-first MetaTensor.

    Raises FileNotFoundError for a missing path, and ValueError naming the file for an unreadable
    file or an image that is not 2D or single-channel 3D (4D / time series are rejected).
    """

    def __init__(self, dtype=np.float32) -> None:
        common = {"image_only": True, "ensure_channel_first": True, "dtype": dtype}
        self.volume_loader = LoadImage(reader=ITKReader(series_meta=True), **common)
        self.display_loader = LoadImage(reader=PILReader(reverse_indexing=False), **common)

    def __call__(self, filename: str | os.PathLike | Sequence[str | os.PathLike]):
        paths = [os.fspath(filename)] if isinstance(filename, (str, os.PathLike)) else [os.fspath(p) for p in filename]
        if not paths:
            raise ValueError("LoadMedicalImage: empty list of files")
        name = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)"
        for path in paths:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: no such file or directory")
        display = {is_display_file(p) for p in paths}
        if len(display) > 1:
            raise ValueError(f"{name}: cannot stack 2D display images with volumes")
        loader = self.display_loader if display.pop() else self.volume_loader
        try:
            img = loader(paths[0] if len(paths) == 1 else paths)
        except Exception as err:  # readers raise RuntimeError, OSError, ITK errors ...
            detail = (str(err).strip().splitlines() or [""])[0]
            problem = (
                "corrupt file or unsupported format" if len(paths) == 1 else "a file is unreadable or sizes differ"
            )
            raise ValueError(f"{name}: cannot be read as an image: {problem} ({type(err).__name__}: {detail})") from err
        spatial = img.ndim - 1
        if spatial not in (2, 3):
            raise ValueError(
                f"{name}: {spatial}D image of shape {tuple(img.shape[1:])}; expected a 2D image or a 3D volume "
                "(4D / time series are not supported: extract one volume first)"
            )
        max_channels = 4 if spatial == 2 else 1
        if len(paths) == 1 and img.shape[0] > max_channels:
            raise ValueError(
                f"{name}: {img.shape[0]} channels in a {spatial}D image of shape {tuple(img.shape)}; expected at "
                f"most {max_channels} (multi-channel or 4D volumes are not supported: extract one volume first)"
            )
        return img


class LoadMedicalImaged(MapTransform):
    """Dictionary version of `LoadMedicalImage`; a key may hold one path or a list of mask paths."""

    def __init__(self, keys: KeysCollection, dtype=np.float32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadMedicalImage(dtype=dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
