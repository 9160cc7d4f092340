"""SAM-UNet: a frozen SAM image encoder, a parallel trainable conv branch and a multi-scale mask decoder."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from segment_anything.modeling import PromptEncoder

from .adapters import Reshaper, upsampling_adapter
from .contract import (
    ARCHITECTURE_ARGS,
    PAPER_ARCHITECTURE,
    contract_arguments,
    contradictions,
    describe_architecture,
    infer_architecture,
    make_contract,
)
from .conv_branch import STAGE_STRIDES, ConvBranch
from .decoder import MaskDecoder
from .interface import PromptableNetworkMixin
from .pixels import check_pixel_normalization, default_pixel_normalization
from .weights import NAMED_WEIGHTS, WeightsFile, load_state, read_weights, trained_prompts

logger = logging.getLogger(__name__)

BACKBONES = ("vit_b", "vit_tiny", "tiny_vit")


def build_backbone(name: str, image_size: int) -> nn.Module:
    """Build the frozen image encoder named ``name`` at ``image_size``."""
    if name in ("vit_b", "vit_tiny"):
        from .vit_backbone import ViTBackbone

        return ViTBackbone(name, image_size)
    if name == "tiny_vit":
        from .tiny_vit_backbone import TinyViTBackbone

        return TinyViTBackbone(image_size)
    raise ValueError(f"Unknown backbone {name!r}; expected one of {BACKBONES}")


def resolve_network_args(explicit: dict, weights: WeightsFile | None = None) -> dict:
    """The SAMUNet architecture and pixel normalisation for ``explicit`` arguments and ``weights``.

    Each argument comes from, in order: the config (``explicit``), the checkpoint's model contract, what a
    contract-less checkpoint's keys imply, the paper's network. An explicit argument that contradicts the contract is
    a ValueError naming both. Returns the SAMUNet arguments, the pixel normalisation among them (weights excluded).
    """
    explicit = {k: v for k, v in explicit.items() if v is not None}
    recorded: dict = {}
    implied: dict = {}
    if weights is not None and weights.contract is not None:
        wrong = contradictions(weights.contract, explicit)
        if wrong:
            raise ValueError(
                f"{weights.path} holds a {describe_architecture(weights.contract['architecture'])} network, but the "
                f"config asks for another: {'; '.join(wrong)}. Drop those network_def / pixel_normalization "
                "overrides to use the checkpoint's network, or give weights that fit the configured one"
            )
        recorded = contract_arguments(weights.contract)
    elif weights is not None:
        implied = infer_architecture(weights.state, weights.source_format)
    merged = {**PAPER_ARCHITECTURE, **implied, **recorded, **explicit}
    pixels = merged.pop("pixel_normalization", None) or default_pixel_normalization(
        merged["backbone"], weights.source_format if weights is not None else None
    )
    return {**{k: merged[k] for k in ARCHITECTURE_ARGS}, "pixel_normalization": check_pixel_normalization(pixels)}


class SAMUNet(PromptableNetworkMixin, nn.Module):
    """Prompted 2D segmentation network (SAM-UNet, arXiv 2408.09886).

    Args:
        backbone: frozen image encoder, ``"vit_b"`` (SAM ViT-B), ``"tiny_vit"`` (LiteMedSAM) or ``"vit_tiny"`` (a
            small ViT of the same structure, for tests).
        image_size: square network input size in pixels (256 in the paper).
        conv_branch: ``"resnet34"``, ``"resnet50"``, ``"resnet18"`` or ``"none"``; its stage outputs are added to
            the encoder tokens.
        fusion: multi-scale fusion path in the decoder (bridge adapters + embedding encoder).
        decoder_tokens: ``"med"`` (SAM-UNet's med token) or ``"sam"`` (SAM's own output tokens).
        weights: a checkpoint file (any format of :mod:`bundle.networks.weights`: the bundle's own, official SAM,
            LiteMedSAM, reference SAM-UNet, torchvision ResNet) or ``"litemedsam"``. A bundle checkpoint whose
            contract names ``base_weights`` (``"litemedsam"``) holds part of a network (the prompt encoder and mask
            decoder ``scripts/train_click_decoder.py`` writes): the base weights are loaded first, then the file.
        pixel_normalization: ``"sam"`` or ``"litemedsam"`` (:mod:`bundle.networks.pixels`).

    Arguments left ``None`` come from the weights: a bundle checkpoint's model contract, or what a checkpoint's keys
    imply (``weights="litemedsam"`` alone is LiteMedSAM); without weights, the paper's ViT-B + ResNet34 network. A
    given argument that contradicts the checkpoint's contract is a ValueError naming both.

    ``forward(image, boxes, points, point_labels, mask_inputs)`` returns mask logits ``[N, 1, H, W]``; see
    :meth:`encode` and :meth:`decode` to reuse one image embedding for many prompts, and :meth:`preprocess` for
    the input scaling its weights expect.
    """

    def __init__(
        self,
        backbone: str | None = None,
        image_size: int | None = None,
        conv_branch: str | None = None,
        fusion: bool | None = None,
        decoder_tokens: str | None = None,
        weights: str | None = None,
        pixel_normalization: str | None = None,
    ) -> None:
        super().__init__()
        explicit = {
            "backbone": backbone,
            "image_size": image_size,
            "conv_branch": conv_branch,
            "fusion": fusion,
            "decoder_tokens": decoder_tokens,
            "pixel_normalization": pixel_normalization,
        }
        # what the config gave (the rest came from the weights): a checkpoint that contradicts it is refused
        self.explicit_args = {k: v for k, v in explicit.items() if v is not None}
        source = read_weights(weights) if weights else None
        architecture = resolve_network_args(explicit, source)
        self.pixel_normalization = architecture.pop("pixel_normalization")
        backbone, image_size, conv_branch, fusion, decoder_tokens = (architecture[k] for k in ARCHITECTURE_ARGS)
        fusion = bool(fusion)
        self.image_size = image_size
        self.backbone = backbone
        # the architecture arguments (weights excluded): the model contract of its checkpoints and exported files
        self.config = dict(architecture, fusion=fusion)
        self.load_report = None
        # what the weights were trained to follow (("box",) for LiteMedSAM); None when unknown
        self.trained_prompts = trained_prompts(source) if source is not None else None
        self.image_encoder = build_backbone(backbone, image_size)
        self.image_encoder.requires_grad_(False)
        embedding_size = self.image_encoder.embedding_size
        self.mask_input_size = 4 * embedding_size
        self.prompt_encoder = PromptEncoder(
            embed_dim=256,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        )
        fusion_residual = getattr(self.image_encoder, "zero_init_fusion", False)
        self.mask_decoder = MaskDecoder(256, tokens=decoder_tokens, fusion=fusion, fusion_residual=fusion_residual)

        self.conv_branch = None
        if conv_branch != "none":
            self.conv_branch = ConvBranch(conv_branch)
            self.adapters_in = nn.ModuleList(
                Reshaper(image_size // stride, channels, size, dim)
                for stride, channels, (dim, size) in zip(
                    STAGE_STRIDES, self.conv_branch.stage_channels, self.image_encoder.injection_shapes
                )
            )
        if fusion:
            # adapters_bridge[2 - i] takes the grid after global block i (U-Net order: deepest first), as in the reference
            self.adapters_bridge = nn.ModuleList(
                self._bridge(dim, size) for dim, size in reversed(self.image_encoder.bridge_shapes)
            )
            self.embedding_encoder = upsampling_adapter(256, 64, 32)
        if fusion_residual:
            self._zero_init_injection()
        if source is not None:
            base = (source.contract or {}).get("base_weights")
            if base is not None:  # a file holding part of a network (a fine-tuned decoder) on top of named weights
                if not isinstance(base, str) or base.lower() not in NAMED_WEIGHTS:
                    raise ValueError(
                        f"{source.path}: unknown base_weights {base!r}; expected one of {sorted(NAMED_WEIGHTS)}"
                    )
                load_state(self, read_weights(base), log_level=logging.DEBUG)
            self.load_report = load_state(self, source, log_level=logging.DEBUG)
            origin = "its model contract" if source.contract is not None else f"{source.source_format} weights"
            logger.info(
                "network from %s (%s): %s, pixel normalisation %s; %s",
                source.name,
                origin,
                describe_architecture(self.config),
                self.pixel_normalization,
                self.load_report.summary(),
            )

    def contract(self) -> dict:
        """The model contract of the current weights (:mod:`bundle.networks.contract`), saved with checkpoints."""
        return make_contract(self)

    def _bridge(self, channels: int, size: int) -> nn.Module:
        """Token grid ``[B, channels, size, size]`` -> ``[B, 32, 4e, 4e]`` (e = embedding size)."""
        target = 4 * self.image_encoder.embedding_size
        if target == 4 * size:
            return upsampling_adapter(channels, 256, 32)
        return Reshaper(size, channels, target, 32)

    def _zero_init_injection(self) -> None:
        """Zero the last layer of every injected path so a fresh model equals its pretrained backbone."""
        last_layers = []
        if self.mask_decoder.fusion:
            last_layers += [self.mask_decoder.embedding_maskfeature[-1], self.embedding_encoder[-1]]
            last_layers += [
                adapter.reshaper[-1] if isinstance(adapter, Reshaper) else adapter[-1]
                for adapter in self.adapters_bridge
            ]
        if self.conv_branch is not None:
            last_layers += [adapter.reshaper[-1] for adapter in self.adapters_in]
        for layer in last_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def train(self, mode: bool = True) -> "SAMUNet":
        """Set training mode; the frozen image encoder always stays in eval mode (its norms keep their statistics)."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    # ----------------------------------------------------------------------------------------------------------- encode
    def encode(self, image: torch.Tensor, checkpoint_activations: bool = False) -> dict[str, torch.Tensor]:
        """Encode a normalised ``[B, 3, S, S]`` image into ``{"embedding", "multi_scale"}`` (the latter with fusion).

        ``checkpoint_activations`` (training): the frozen encoder recomputes the activations the backward pass needs
        instead of keeping them (same values and gradients, less memory, one more encoder pass in the backward).
        """
        self._check_image(image)
        return self.fuse(*self.encode_backbone(image, checkpoint_activations))

    def encode_backbone(
        self, image: torch.Tensor, checkpoint_activations: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The image encoder's outputs for ``image`` (with the conv branch injected): the embedding ``[B, 256, e, e]``
        and the intermediate grids the fusion path takes. Without a trained conv branch they depend on the frozen
        encoder only, so they can be computed once per image and cached (:class:`bundle.networks.FeatureDecoder`)."""
        injections = None
        if self.conv_branch is not None:
            stages = self.conv_branch(image)
            injections = [adapter(feature) for adapter, feature in zip(self.adapters_in, stages)]
        return self.image_encoder.forward_features(image, injections, checkpoint_activations)

    def fuse(self, embedding: torch.Tensor, intermediates: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decoder's features from :meth:`encode_backbone`'s outputs (the trained bridge adapters of the fusion
        path, when present)."""
        features = {"embedding": embedding}
        if self.mask_decoder.fusion:
            multi_scale = self.embedding_encoder(embedding)
            for index, grid in enumerate(intermediates):
                multi_scale = multi_scale + self.adapters_bridge[len(intermediates) - 1 - index](grid)
            features["multi_scale"] = multi_scale
        return features

    # ----------------------------------------------------------------------------------------------------------- decode
    def decode_low_res(
        self,
        features: dict[str, torch.Tensor],
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode prompts into low-resolution logits ``[N, 1, 4e, 4e]`` (feed back as ``mask_inputs``).

        Each prompt row n belongs to image ``image_index[n]`` of ``features`` (default: row n to image n).
        With no prompt at all, every image is segmented with a whole-image box.
        """
        batch = features["embedding"].shape[0]
        boxes, points, point_labels, mask_inputs, image_index = self._check_prompts(
            batch, boxes, points, point_labels, mask_inputs, image_index
        )
        sparse, dense = self.prompt_encoder(
            points=None if points is None else (points, point_labels), boxes=boxes, masks=mask_inputs
        )
        embedding = features["embedding"][image_index]
        multi_scale = features["multi_scale"][image_index] if "multi_scale" in features else None
        return self.mask_decoder(embedding, self.prompt_encoder.get_dense_pe(), sparse, dense, multi_scale)

    # ------------------------------------------------------------------------------------------------------- validation
    def _check_image(self, image: torch.Tensor) -> None:
        size = self.image_size
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image must be a [B, 3, {size}, {size}] tensor, got {shape}")
        if image.shape[1] != 3:
            raise ValueError(f"image must have 3 channels (RGB or grey replicated), got {image.shape[1]} channels")
        if tuple(image.shape[2:]) != (size, size):
            raise ValueError(
                f"image spatial size must be {size}x{size} (resize the longest side and pad), got {tuple(image.shape[2:])}"
            )
        if not image.is_floating_point():
            raise ValueError(f"image must be a normalised floating-point tensor, got dtype {image.dtype}")

    def _check_prompts(self, batch, boxes, points, point_labels, mask_inputs, image_index):
        device = self.prompt_encoder.no_mask_embed.weight.device
        return check_prompts(
            self.image_size, self.mask_input_size, device, batch, boxes, points, point_labels, mask_inputs, image_index
        )


def check_prompts(size, mask_input_size, device, batch, boxes, points, point_labels, mask_inputs, image_index):
    """Validate prompts for ``batch`` images in a ``size`` frame; returns them as tensors on ``device`` with
    ``image_index`` filled in and, with no prompt at all, one whole-image box per image."""
    if points is not None and point_labels is None:
        raise ValueError("points were given without point_labels (1 foreground, 0 background, -1 padding)")
    if point_labels is not None and points is None:
        raise ValueError("point_labels were given without points")
    counts = {}
    if boxes is not None:
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be [N, 4] (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
        if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
            raise ValueError(f"boxes must have x0 <= x1 and y0 <= y1 (XYXY), got {boxes.tolist()}")
        if (boxes < 0).any() or (boxes > size - 1).any():
            raise ValueError(
                f"boxes must lie inside the {size}x{size} network frame [0, {size - 1}], got {boxes.tolist()}"
            )
        counts["boxes"] = boxes.shape[0]
    if points is not None:
        points = torch.as_tensor(points, dtype=torch.float32, device=device)
        point_labels = torch.as_tensor(point_labels, device=device)
        if points.ndim != 3 or points.shape[2] != 2:
            raise ValueError(f"points must be [N, P, 2] (x, y), got shape {tuple(points.shape)}")
        if point_labels.shape != points.shape[:2]:
            raise ValueError(
                f"point_labels must be [N, P] matching points {tuple(points.shape[:2])}, got {tuple(point_labels.shape)}"
            )
        if not torch.isin(point_labels, torch.tensor([-1, 0, 1], device=device)).all():
            raise ValueError(
                f"point_labels must be 1 (foreground), 0 (background) or -1 (padding), got {point_labels.tolist()}"
            )
        valid = point_labels != -1
        if ((points < 0) | (points > size - 1)).any(dim=-1)[valid].any():
            raise ValueError(f"points must lie inside the {size}x{size} network frame [0, {size - 1}]")
        counts["points"] = points.shape[0]
    if mask_inputs is not None:
        expected = (1, mask_input_size, mask_input_size)
        if mask_inputs.ndim != 4 or tuple(mask_inputs.shape[1:]) != expected:
            raise ValueError(
                f"mask_inputs must be [N, {', '.join(map(str, expected))}] low-res logits, got {tuple(mask_inputs.shape)}"
            )
        counts["mask_inputs"] = mask_inputs.shape[0]
    if len(set(counts.values())) > 1:
        raise ValueError(f"prompt batch sizes differ: {counts}")
    n_prompts = next(iter(counts.values())) if counts else batch
    if image_index is None:
        if n_prompts != batch:
            raise ValueError(
                f"{n_prompts} prompts for {batch} images: give one prompt per image or an image_index per prompt"
            )
        image_index = torch.arange(batch, device=device)
    else:
        image_index = torch.as_tensor(image_index, dtype=torch.long, device=device)
        if image_index.shape != (n_prompts,) or (image_index < 0).any() or (image_index >= batch).any():
            raise ValueError(f"image_index must hold {n_prompts} indices in [0, {batch}), got {image_index.tolist()}")
    if not counts:
        boxes = torch.tensor([[0.0, 0.0, size - 1.0, size - 1.0]], device=device).expand(batch, -1)
    return boxes, points, point_labels, mask_inputs, image_index
