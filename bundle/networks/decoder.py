"""Mask decoder: SAM's two-way transformer and upscaling, one output mask per prompt, optional multi-scale fusion."""

from __future__ import annotations

import torch
import torch.nn as nn
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP

TOKEN_MODES = ("med", "sam")


class MaskDecoder(nn.Module):
    """Predict one mask per prompt from an image embedding and prompt embeddings.

    Args:
        transformer_dim: channel width of the embedding and the tokens (256 for every SAM).
        tokens: ``"med"`` uses SAM-UNet's single learned med token; ``"sam"`` keeps SAM's IoU token and four mask
            tokens in the attention (as in SAM with ``multimask_output=False``) and reads the mask from the first mask
            token, so plain SAM / LiteMedSAM decoders are reproduced exactly.
        fusion: add the HQ-SAM style path: ``embedding_maskfeature(upscaled) + multi_scale_feature``.
        fusion_residual: keep SAM's upscaled features and add the fusion path on top (used with zero-initialised
            fusion layers so a fresh model reproduces the pretrained decoder).
    """

    def __init__(
        self, transformer_dim: int = 256, tokens: str = "med", fusion: bool = True, fusion_residual: bool = False
    ) -> None:
        super().__init__()
        if tokens not in TOKEN_MODES:
            raise ValueError(f"Unknown decoder token mode {tokens!r}; expected one of {TOKEN_MODES}")
        self.tokens = tokens
        self.fusion = fusion
        self.fusion_residual = fusion_residual
        self.transformer = TwoWayTransformer(depth=2, embedding_dim=transformer_dim, mlp_dim=2048, num_heads=8)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        if tokens == "med":
            self.med_token = nn.Embedding(1, transformer_dim)
        else:
            self.iou_token = nn.Embedding(1, transformer_dim)
            self.mask_tokens = nn.Embedding(4, transformer_dim)
        self.hf_mlp = MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
        if fusion:
            self.embedding_maskfeature = nn.Sequential(
                nn.Conv2d(transformer_dim // 8, transformer_dim // 4, 3, 1, 1),
                LayerNorm2d(transformer_dim // 4),
                nn.GELU(),
                nn.Conv2d(transformer_dim // 4, transformer_dim // 8, 3, 1, 1),
            )

    def output_tokens(self) -> torch.Tensor:
        """The learned output tokens ``[T, C]`` placed before the prompt tokens."""
        if self.tokens == "med":
            return self.med_token.weight
        return torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multi_scale_feature: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return low-resolution mask logits ``[N, 1, 4h, 4w]``; all inputs are already one row per prompt."""
        output_tokens = self.output_tokens().unsqueeze(0).expand(sparse_prompt_embeddings.shape[0], -1, -1)
        tokens = torch.cat([output_tokens.to(sparse_prompt_embeddings.dtype), sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        b, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
        mask_token_out = hs[:, 0 if self.tokens == "med" else 1, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        if self.fusion:
            if multi_scale_feature is None:
                raise ValueError("The fusion decoder needs the multi-scale feature from encode()")
            fused = self.embedding_maskfeature(upscaled) + multi_scale_feature
            upscaled = upscaled + fused if self.fusion_residual else fused
        hyper_in = self.hf_mlp(mask_token_out).unsqueeze(1)
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, 1, h, w)
