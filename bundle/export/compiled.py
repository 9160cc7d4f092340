"""A SAMUNet whose image encoder runs through a compiler: ``torch.compile`` or MONAI's TensorRT ``trt_compile``.

The encoder is most of the work of prompted inference (one call per slice; the decoder runs per prompt on cached
features), so only it is compiled. :class:`CompiledEncoderSAMUNet` keeps the network's interface (``encode``,
``decode_low_res``, ``upsample_logits``, ``forward``), so the bundle's inferers use it unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from monai.data import MetaTensor

from bundle.networks import SAMUNet
from bundle.networks.interface import PromptableNetworkMixin

from .modules import ImageEncoderExport

logger = logging.getLogger(__name__)


class CompiledEncoderSAMUNet(PromptableNetworkMixin, nn.Module):
    """``network`` with ``encode`` served by ``encoder`` (a compiled :class:`ImageEncoderExport` of it)."""

    def __init__(self, network: SAMUNet, encoder: nn.Module) -> None:
        super().__init__()
        self.network = network.eval()
        self.encoder = encoder
        self.feature_names = ImageEncoderExport(network).names
        self.image_size = network.image_size
        self.mask_input_size = network.mask_input_size
        self.config = network.config
        self.pixel_normalization = network.pixel_normalization

    def encode(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        # a plain tensor: compilers do not trace through MONAI MetaTensor's __torch_function__
        image = image.as_tensor() if isinstance(image, MetaTensor) else image
        return dict(zip(self.feature_names, self.encoder(image)))

    def decode_low_res(self, features, **prompts) -> torch.Tensor:
        return self.network.decode_low_res(features, **prompts)


def torch_compile_encoder(network: SAMUNet, **compile_kwargs: Any) -> CompiledEncoderSAMUNet:
    """``torch.compile`` of the image encoder (inductor with ``freezing``: the frozen weights are constant-folded,
    BatchNorm included); the first call of each new batch size compiles (about 35 s for TinyViT on 2 CPU cores)."""
    compile_kwargs.setdefault("options", {"freezing": True})
    return CompiledEncoderSAMUNet(network, torch.compile(ImageEncoderExport(network), **compile_kwargs))


def trt_compile_encoder(network: SAMUNet, base_path: str, args: dict | None = None) -> CompiledEncoderSAMUNet | SAMUNet:
    """MONAI ``trt_compile`` of the image encoder: a TensorRT engine built on first use and saved as
    ``{base_path}.plan`` (reused while newer than the weights). Needs CUDA, ``tensorrt`` and ``polygraphy``: without
    CUDA, ``network`` itself is returned with a one-line warning (PyTorch, as ``configs/inference.json`` runs);
    without the packages MONAI logs that ``trt_compile`` has no effect and the encoder runs in PyTorch."""
    from monai.networks import trt_compile

    if not torch.cuda.is_available():
        logger.warning("TensorRT needs CUDA, which is not available: running the network in PyTorch instead")
        return network

    return CompiledEncoderSAMUNet(network, trt_compile(ImageEncoderExport(network), base_path, args=args))
