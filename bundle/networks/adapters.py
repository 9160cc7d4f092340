"""Adapters that carry features between the convolutional branch, the ViT token grid and the decoder."""

from __future__ import annotations

import math

import torch.nn as nn
from segment_anything.modeling.common import LayerNorm2d


class Reshaper(nn.Module):
    """Map a conv feature ``[B, c_in, s_in, s_in]`` onto a token grid ``[B, c_out, s_out, s_out]``.

    Larger inputs go through ``log2(s_in / s_out)`` stride-2 3x3 convs that double the channels, smaller ones
    through stride-2 transposed convs that halve them (each followed by LayerNorm2d + GELU), then a 1x1 conv.
    Layers live in ``self.reshaper`` (a ``ModuleList``) so reference SAM-UNet checkpoints map key for key.
    """

    def __init__(self, size_in: int, channels_in: int, size_out: int, channels_out: int) -> None:
        super().__init__()
        ratio = max(size_in, size_out) / min(size_in, size_out)
        steps = math.log2(ratio)
        if not steps.is_integer():
            raise ValueError(f"Reshaper sizes must differ by a power of two, got {size_in} -> {size_out}")
        layers: list[nn.Module] = []
        channels = channels_in
        for _ in range(int(steps)):
            if size_in > size_out:
                layers.append(nn.Conv2d(channels, channels * 2, kernel_size=3, stride=2, padding=1))
                channels *= 2
            else:
                layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
                channels //= 2
            layers += [LayerNorm2d(channels), nn.GELU()]
        layers.append(nn.Conv2d(channels, channels_out, kernel_size=1))
        self.reshaper = nn.ModuleList(layers)
        for module in self.reshaper:
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x):
        for layer in self.reshaper:
            x = layer(x)
        return x


def upsampling_adapter(channels_in: int, channels_mid: int, channels_out: int) -> nn.Sequential:
    """Two stride-2 transposed convs (x4 spatially) with LayerNorm2d + GELU between them.

    Used for the bridge adapters (ViT tokens -> multi-scale feature) and the embedding encoder (neck -> feature);
    indices 0, 1, 3 carry weights, as in the reference checkpoints.
    """
    return nn.Sequential(
        nn.ConvTranspose2d(channels_in, channels_mid, kernel_size=2, stride=2),
        LayerNorm2d(channels_mid),
        nn.GELU(),
        nn.ConvTranspose2d(channels_mid, channels_out, kernel_size=2, stride=2),
    )
