"""What every network runtime offers (PyTorch ``SAMUNet``, its compiled-encoder wrapper, the ONNX Runtime network),
so the inferers, engines and servers work with any of them.

An embedding is computed once per image with ``encode`` and reused for every prompt with ``decode_low_res`` /
``decode``; ``preprocess`` turns [0, 255] images into the network's input the way its weights expect.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pixels import frame_transforms, pixel_transforms, preprocess, scale_pixels

Features = dict[str, torch.Tensor]


@runtime_checkable
class PromptableNetwork(Protocol):
    """A promptable segmentation network.

    Attributes:
        image_size: side ``S`` of the square network input.
        mask_input_size: side of the low-resolution logits (``4 x`` the embedding grid), also ``mask_inputs``'s size.
        pixel_normalization: the scheme of :mod:`bundle.networks.pixels` its weights expect.
    """

    image_size: int
    mask_input_size: int
    pixel_normalization: str

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 1 or 3, H, W]`` in [0, 255] -> network input ``[N, 3, S, S]``."""
        ...

    def scale_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 1 or 3, H, W]`` in [0, 255] -> ``[N, 3, H, W]``: the pixel scaling alone, at the images' own size."""
        ...

    def encode(self, image: torch.Tensor) -> Features:
        """Network input ``[B, 3, S, S]`` -> features (``embedding`` and, with the fusion path, ``multi_scale``)."""
        ...

    def decode_low_res(
        self,
        features: Features,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompts (one row each; ``image_index`` maps rows to images) -> low-res logits ``[N, 1, m, m]``."""
        ...

    def upsample_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """``[N, 1, m, m]`` -> ``[N, 1, S, S]`` (bilinear)."""
        ...

    def decode(self, features: Features, **prompts) -> torch.Tensor:
        """Prompts -> logits ``[N, 1, S, S]`` at the network input size."""
        ...

    def forward(self, image: torch.Tensor, **prompts) -> torch.Tensor:
        """``decode(encode(image), **prompts)``; with no prompt a whole-image box."""
        ...


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def upsample_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinearly resize low-resolution logits ``[N, 1, h, w]`` to ``[N, 1, size, size]``."""
    return F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)


class PromptableNetworkMixin:
    """The parts of :class:`PromptableNetwork` that follow from ``encode``, ``decode_low_res``, ``image_size`` and
    ``pixel_normalization``; a runtime defines those and inherits the rest."""

    image_size: int
    pixel_normalization: str

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 1 or 3, H, W]`` in [0, 255] -> network input ``[N, 3, S, S]`` (:func:`bundle.networks.pixels.preprocess`)."""
        return preprocess(images, self.pixel_normalization, self.image_size)

    def frame_transforms(self, image_key: str, label_keys=(), label_mode: str = "nearest-exact") -> list:
        """The dictionary transforms that make this network's input from a [0, 255] image (training pipelines)."""
        return frame_transforms(self.pixel_normalization, image_key, label_keys, self.image_size, label_mode)

    def scale_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 1 or 3, H, W]`` in [0, 255] -> ``[N, 3, H, W]``: the pixel scaling of :meth:`preprocess` at the images'
        own size, for windowed inference (:func:`bundle.networks.pixels.scale_pixels`)."""
        return scale_pixels(images, self.pixel_normalization)

    def pixel_transforms(self, image_key: str) -> list:
        """Dictionary transforms: [0, 255] image or volume -> this network's pixel scaling at its own resolution
        (windowed pipelines: windows of ``image_size`` are cut from it afterwards)."""
        return pixel_transforms(self.pixel_normalization, image_key)

    def upsample_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        return upsample_logits(low_res, self.image_size)

    def decode(self, features: Features, **prompts) -> torch.Tensor:
        return self.upsample_logits(self.decode_low_res(features, **prompts))

    def forward(self, image: torch.Tensor, **prompts) -> torch.Tensor:
        return self.decode(self.encode(image), **prompts)
