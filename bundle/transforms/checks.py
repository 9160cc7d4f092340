"""Input checks shared by the transforms; every error names the file or key it is about."""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["describe", "require_finite"]


def describe(img, key: str | None = None) -> str:
    """Human-readable origin of an array: ``key 'label' (file /x/y.nii.gz)``, or ``'image'`` if unknown."""
    filename = (getattr(img, "meta", None) or {}).get("filename_or_obj")
    parts = []
    if key is not None:
        parts.append(f"key {key!r}")
    if isinstance(filename, (str, os.PathLike)) and os.fspath(filename):
        parts.append(f"file {os.fspath(filename)}")
    if not parts:
        return "image"
    return parts[0] if len(parts) == 1 else f"{parts[0]} ({parts[1]})"


def require_finite(img, source: str) -> None:
    """Raise ValueError naming ``source`` if ``img`` holds NaN or infinite values."""
    if isinstance(img, torch.Tensor):
        bad = int((~torch.isfinite(img)).sum()) if img.is_floating_point() else 0
    else:
        arr = np.asarray(img)
        bad = int((~np.isfinite(arr)).sum()) if np.issubdtype(arr.dtype, np.floating) else 0
    if bad:
        raise ValueError(f"{source}: {bad} NaN/Inf intensity value(s); expected finite intensities")
