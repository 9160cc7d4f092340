"""The trained, decoder-side part of a SAMUNet run on cached encoder outputs: prompt-free task training that encodes
each training window once.

A task model segments one target with no prompt (the whole-image box). When only parts after the frozen image encoder
are trained (prompt encoder, mask decoder, the fusion path's bridge adapters), the encoder's outputs for a window never
change during training, so they are computed once and reused every epoch. A conv branch that is trained injects into
the encoder and changes its outputs at every step: such a network trains on images (no cache).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["FeatureDecoder"]


class FeatureDecoder(nn.Module):
    """``forward(embedding, *intermediates)`` -> mask logits ``[B, 1, S, S]`` of ``network`` with no prompt, on the
    outputs of its (frozen) image encoder.

    Args:
        network: a :class:`bundle.networks.SAMUNet` whose conv branch is absent or frozen.

    :meth:`encode` makes the cache entry of a batch of network inputs: ``{"image": embedding, "stage_0": ..., ...}``
    (the intermediate grids only when the fusion path needs them); :attr:`extra_keys` names those extra entries in the
    order ``forward`` takes them (MONAI's ``PrepareBatchExtraInput(extra_keys)`` passes them positionally).
    The parameters are ``network``'s own, so a checkpoint of ``network`` holds what was trained.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        branch = getattr(network, "conv_branch", None)
        if branch is not None and any(p.requires_grad for p in branch.parameters()):
            raise ValueError(
                "encoder features cannot be cached for a network whose conv branch is trained: it injects into the "
                "frozen encoder and changes its outputs at every step. Use network_def#conv_branch 'none' (the "
                "decoder-side parts train on cached features) or cache_features false (the whole network trains on "
                "images)"
            )
        self.network = network
        stages = len(network.image_encoder.bridge_shapes) if network.mask_decoder.fusion else 0
        self.extra_keys = [f"stage_{i}" for i in range(stages)]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Network inputs ``[B, 3, S, S]`` -> the cache entries (embedding, and intermediate grids for fusion)."""
        network = self.network
        was_training = network.training
        network.eval()
        try:
            network._check_image(images)
            embedding, intermediates = network.encode_backbone(images)
        finally:
            network.train(was_training)
        return {"image": embedding, **dict(zip(self.extra_keys, intermediates))}

    def forward(self, embedding: torch.Tensor, *intermediates: torch.Tensor) -> torch.Tensor:
        if len(intermediates) != len(self.extra_keys):
            raise ValueError(
                f"expected {len(self.extra_keys)} intermediate grids ({self.extra_keys}), got {len(intermediates)}"
            )
        return self.network.decode(self.network.fuse(embedding, list(intermediates)))
