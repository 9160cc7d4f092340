"""The pixel normalisation a set of weights expects: how a network turns [0, 255] images into its input.

Two schemes exist, each tied to the weights a network was trained with:

- ``"sam"``: SAM's per-channel mean / std (``SAMPixelNormalize``), then the network frame (longest side to ``S``,
  zero padding bottom/right, so the padding is 0 in normalised space). SAM ViT-B and SAM-UNet weights.
- ``"litemedsam"``: the network frame, then min-max of the unpadded region to [0, 1] (``LiteMedSAMScale``).
  LiteMedSAM weights, and SAM-UNet-Lite trained from them.

A network's ``pixel_normalization`` attribute names its scheme (from its checkpoint, its weights or its backbone);
training (:func:`frame_transforms`), inference and export (:func:`preprocess`) all go through this module, so no
entry point scales inputs differently from the others.

Windowed inference and prompt-free training on windows scale the pixels of the whole image at its own resolution
(:func:`pixel_transforms`, :func:`scale_pixels`) and cut ``S x S`` windows from it afterwards; zero padding added
then is 0 in normalised space, as in the frame. For an image whose longest side is ``S`` both ways give the same
network input (the frame's resize is the identity there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PIXEL_NORMALIZATIONS = ("sam", "litemedsam")


def check_pixel_normalization(name: str) -> str:
    """``name`` if it is a known scheme, else ValueError listing them."""
    if name not in PIXEL_NORMALIZATIONS:
        raise ValueError(f"pixel_normalization must be one of {PIXEL_NORMALIZATIONS}, got {name!r}")
    return name


def default_pixel_normalization(backbone: str, weights_format: str | None = None) -> str:
    """The scheme a network's weights imply: LiteMedSAM's for LiteMedSAM weights and the TinyViT backbone, else SAM's."""
    return "litemedsam" if weights_format == "litemedsam" or backbone == "tiny_vit" else "sam"


def frame_transforms(
    name: str, image_key: str, label_keys: Sequence[str] = (), size: int = 256, label_mode: str = "nearest-exact"
) -> list:
    """Dictionary transforms: image ``[3, H, W]`` in [0, 255] (and its labels) -> the ``size`` x ``size`` network
    input; labels are resized with ``label_mode`` (exact for masks). Invertible through MONAI's ``Invertd``."""
    from bundle.transforms import LiteMedSAMScaled, SAMPixelNormalized, ToNetworkFramed

    keys = [image_key, *label_keys]
    frame = ToNetworkFramed(keys, size=size, mode=["bilinear"] + [label_mode] * len(label_keys))
    if check_pixel_normalization(name) == "sam":
        return [SAMPixelNormalized(image_key), frame]
    return [frame, LiteMedSAMScaled(image_key, size=size)]


def pixel_transforms(name: str, image_key: str) -> list:
    """Dictionary transforms: image ``[3, H, W]`` (or a volume ``[3, H, W, D]``) in [0, 255] -> the scheme's pixel
    scaling at the array's own resolution (no resizing, no padding): SAM's mean / std, or LiteMedSAM's min-max of
    the whole array to [0, 1]."""
    from bundle.transforms import LiteMedSAMScaled, SAMPixelNormalized

    if check_pixel_normalization(name) == "sam":
        return [SAMPixelNormalized(image_key)]
    return [LiteMedSAMScaled(image_key, original_hw_key=None)]


def scale_pixels(images: torch.Tensor, name: str) -> torch.Tensor:
    """Images ``[N, C, H, W]`` (C = 1 grey or 3 RGB) in [0, 255] -> ``[N, 3, H, W]`` with the scheme's pixel scaling
    (each image on its own), at their own size: the input windowed inference cuts network windows from."""
    from bundle.transforms import LiteMedSAMScale, SAMPixelNormalize

    images = _three_channels(images)
    scale = SAMPixelNormalize() if check_pixel_normalization(name) == "sam" else LiteMedSAMScale()
    return _plain(torch.stack([scale(image) for image in images]).float())


def _three_channels(images: torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W] in [0, 255], got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def _plain(tensor) -> torch.Tensor:
    """A plain tensor: MONAI's transforms return MetaTensors, whose per-operation metadata handling would follow the
    network input into the encoder, the embedding cache and every later decode (several ms per click)."""
    from monai.utils import convert_to_tensor

    return convert_to_tensor(tensor, track_meta=False)


def _frame(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, size, size]`` (every image of one grid resized and padded in one call)."""
    from bundle.transforms import ToNetworkFrame

    n, c = images.shape[:2]
    framed = ToNetworkFrame(size)(images.reshape(n * c, *images.shape[2:]))
    return _plain(framed).reshape(n, c, size, size)


def preprocess(images: torch.Tensor, name: str, size: int) -> torch.Tensor:
    """Images ``[N, C, H, W]`` (C = 1 grey or 3 RGB) in [0, 255] -> normalised network input ``[N, 3, size, size]``."""
    from bundle.transforms import LiteMedSAMScale, SAMPixelNormalize

    check_pixel_normalization(name)
    images = _three_channels(images)
    original_hw = tuple(images.shape[-2:])
    if name == "sam":
        normalize = SAMPixelNormalize()
        return _frame(torch.stack([normalize(image) for image in images]), size).float()
    scale = LiteMedSAMScale(size)
    framed = _frame(images, size)
    return _plain(torch.stack([scale(image, original_hw=original_hw) for image in framed]).float())
