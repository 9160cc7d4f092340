"""SAM's ViT image encoder with injection points before its global-attention blocks."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT

from .recompute import recomputed

VIT_CONFIGS = {
    # name -> embed_dim, depth, num_heads, global attention blocks
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_tiny": (96, 8, 2, (1, 3, 5, 7)),  # small configuration for fast tests, same structure
}
PATCH_SIZE = 16
WINDOW_SIZE = 14


class ViTBackbone(ImageEncoderViT):
    """segment_anything's ``ImageEncoderViT`` (state-dict keys unchanged) built at ``image_size``.

    ``forward_features`` adds one feature map per global block to the tokens just before that block and returns
    the neck embedding plus the token grids after the first three global blocks (for multi-scale fusion).
    """

    def __init__(self, name: str = "vit_b", image_size: int = 256) -> None:
        if name not in VIT_CONFIGS:
            raise ValueError(f"Unknown ViT backbone {name!r}; expected one of {sorted(VIT_CONFIGS)}")
        if image_size % PATCH_SIZE:
            raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
        embed_dim, depth, num_heads, global_blocks = VIT_CONFIGS[name]
        super().__init__(
            img_size=image_size,
            patch_size=PATCH_SIZE,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            out_chans=256,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=WINDOW_SIZE,
            global_attn_indexes=global_blocks,
        )
        self.global_blocks = tuple(global_blocks)
        self.embedding_size = image_size // PATCH_SIZE
        grid = (embed_dim, self.embedding_size)
        # where conv features are added (one per global block) and which token grids feed the fusion path
        self.injection_shapes = [grid] * len(self.global_blocks)
        self.bridge_shapes = [grid] * (len(self.global_blocks) - 1)

    def forward_features(
        self, image: torch.Tensor, injections: list[torch.Tensor] | None = None, checkpoint_activations: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``(embedding [B, 256, g, g], token grids [B, C, g, g] after global blocks but the last)``.

        ``checkpoint_activations``: recompute every block after the first injection (and the neck) in the backward
        pass instead of keeping its activations (:func:`bundle.networks.recompute.recomputed`).
        """
        x = self.patch_embed(image)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        intermediates = []
        stage = 0
        for index, block in enumerate(self.blocks):
            if index in self.global_blocks:
                if injections is not None:
                    x = x + injections[stage].permute(0, 2, 3, 1)
                x = recomputed(block, x, checkpoint_activations)
                if stage < len(self.global_blocks) - 1:
                    intermediates.append(x.permute(0, 3, 1, 2))
                stage += 1
            else:
                x = recomputed(block, x, checkpoint_activations)
        return recomputed(self.neck, x.permute(0, 3, 1, 2), checkpoint_activations), intermediates
