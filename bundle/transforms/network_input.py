"""The last preprocessing step: the pixel normalisation a set of weights expects, and the network frame."""

from __future__ import annotations

from monai.config import KeysCollection
from monai.transforms import Compose
from monai.utils import ensure_tuple

from .frame import NETWORK_SIZE, ToNetworkFramed
from .intensity import SAMPixelNormalized
from .lite import LiteMedSAMScaled

PIXEL_NORMALIZATIONS = ("sam", "litemedsam")


class NetworkInputd(Compose):
    """Image in [0, 255] (3 channels) and its labels -> the ``size`` x ``size`` network frame.

    Args:
        keys: the image key first, then label keys (resized with ``label_mode``, exact for masks).
        pixel_normalization: ``"sam"`` (SAM's mean/std, then resize and zero padding: SAM ViT-B / SAM-UNet weights) or
            ``"litemedsam"`` (resize and pad, then min-max of the unpadded frame to [0, 1]: LiteMedSAM weights).
        size: side of the network frame.

    A ``Compose``, so MONAI's ``Invertd`` inverts the frame step through it.
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixel_normalization: str = "sam",
        size: int = NETWORK_SIZE,
        label_mode: str = "nearest-exact",
    ) -> None:
        image_key, *label_keys = ensure_tuple(keys)
        frame = ToNetworkFramed([image_key, *label_keys], size=size, mode=["bilinear"] + [label_mode] * len(label_keys))
        if pixel_normalization == "sam":
            transforms = [SAMPixelNormalized(image_key), frame]
        elif pixel_normalization == "litemedsam":
            transforms = [frame, LiteMedSAMScaled(image_key, size=size)]
        else:
            raise ValueError(f"pixel_normalization must be one of {PIXEL_NORMALIZATIONS}, got {pixel_normalization!r}")
        super().__init__(transforms)
