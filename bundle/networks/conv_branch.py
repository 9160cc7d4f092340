"""The trainable convolutional (U-Net style) branch: a MONAI ResNet returning its four stage outputs."""

from __future__ import annotations

import torch
from monai.networks.nets import ResNet

# name -> (block, layers per stage, output channels of layer1..layer4)
CONV_BRANCHES = {
    "resnet18": ("basic", [2, 2, 2, 2], (64, 128, 256, 512)),
    "resnet34": ("basic", [3, 4, 6, 3], (64, 128, 256, 512)),
    "resnet50": ("bottleneck", [3, 4, 6, 3], (256, 512, 1024, 2048)),
}
STAGE_STRIDES = (4, 8, 16, 32)


class ConvBranch(ResNet):
    """2D ResNet (torchvision layout: shortcut B, no bias on the downsample conv, no fc).

    ``forward`` returns the outputs of ``layer1..layer4`` (strides 4, 8, 16, 32), so torchvision ImageNet
    weights load key for key.
    """

    def __init__(self, name: str = "resnet34") -> None:
        if name not in CONV_BRANCHES:
            raise ValueError(f"Unknown conv branch {name!r}; expected one of {sorted(CONV_BRANCHES)} or 'none'")
        block, layers, channels = CONV_BRANCHES[name]
        super().__init__(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=3,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            bias_downsample=False,
            feed_forward=False,
        )
        self.stage_channels = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features
