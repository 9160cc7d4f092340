"""Export-friendly halves of a :class:`~bundle.networks.SAMUNet`: the image encoder and the prompt decoder.

Both are plain ``forward(tensors) -> tensors`` modules with no optional arguments and no data-dependent Python
branches, so ``torch.jit.trace`` and ``torch.onnx.export`` record them exactly. Prompts use SAM's ONNX convention
(``segment_anything.utils.onnx.SamOnnxModel``): one ``point_coords [N, P, 2]`` / ``point_labels [N, P]`` pair where a
box is two corner points labelled 2 (top-left) and 3 (bottom-right), clicks are 1 (foreground) / 0 (background) and
-1 is padding. :func:`pack_prompts` turns the network's ``boxes`` / ``points`` arguments into that form, so the
exported decoder gives the same sparse embeddings as SAM's ``PromptEncoder``.

SAM's own ``SamOnnxModel`` is not reused because it wraps a ``Sam`` object (fixed token layout, upscaling to the
original image size); SAM-UNet's decoder takes the multi-scale feature as an extra input.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bundle.networks import SAMUNet

DECODER_PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input")
BOX_LABELS = (2.0, 3.0)
PADDING_LABEL = -1.0


def feature_names(network: SAMUNet) -> tuple[str, ...]:
    """Names of the encoder outputs (= the decoder's feature inputs): ``embedding`` and, with fusion, ``multi_scale``."""
    return ("embedding", "multi_scale") if network.mask_decoder.fusion else ("embedding",)


def pack_prompts(
    boxes: torch.Tensor | None, points: torch.Tensor | None, point_labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``boxes [N, 4]`` and/or ``points [N, P, 2]`` + ``point_labels [N, P]`` -> ``(point_coords, point_labels)``.

    Order as in SAM's ``PromptEncoder``: the clicks, then either the box corners (labels 2, 3) or, without a box, one
    padding point (label -1). Labels are float32 (the ONNX input type).
    """
    if boxes is None and points is None:
        raise ValueError("pack_prompts needs boxes, points or both")
    coords, labels = [], []
    if points is not None:
        coords.append(torch.as_tensor(points, dtype=torch.float32))
        labels.append(torch.as_tensor(point_labels, dtype=torch.float32))
    n = coords[0].shape[0] if coords else boxes.shape[0]
    if boxes is not None:
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=coords[0].device if coords else None)
        coords.append(boxes.reshape(-1, 2, 2))
        labels.append(torch.tensor(BOX_LABELS, device=boxes.device).expand(n, 2))
    else:
        coords.append(torch.zeros(n, 1, 2, device=coords[0].device))
        labels.append(torch.full((n, 1), PADDING_LABEL, device=coords[0].device))
    return torch.cat(coords, dim=1), torch.cat(labels, dim=1)


class ImageEncoderExport(nn.Module):
    """``forward(image [B, 3, S, S]) -> (embedding, multi_scale?)``: the network's :meth:`~SAMUNet.encode`."""

    def __init__(self, network: SAMUNet) -> None:
        super().__init__()
        self.network = network
        self.names = feature_names(network)
        self.eval()  # a new module starts in training mode, and exporters restore that mode on the whole network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.network.encode(image)
        return tuple(features[name] for name in self.names)


class PromptDecoderExport(nn.Module):
    """``forward(*features, point_coords, point_labels, mask_input, has_mask_input) -> low-res logits [N, 1, 4e, 4e]``.

    One row per prompt (repeat an image's features for several prompts). ``mask_input [N, 1, 4e, 4e]`` is a previous
    low-res logit map, used where ``has_mask_input [1]`` is 1 (otherwise SAM's "no mask" embedding). The sparse
    embedding is SAM ``PromptEncoder``'s, written with ``torch.where`` and a label lookup instead of boolean-mask
    assignment (which ONNX Runtime cannot run with a dynamic number of points).
    """

    def __init__(self, network: SAMUNet) -> None:
        super().__init__()
        self.network = network
        self.n_features = len(feature_names(network))
        self.eval()

    def sparse_embedding(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        prompt = self.network.prompt_encoder
        size = (self.network.image_size, self.network.image_size)
        embedding = prompt.pe_layer.forward_with_coords(point_coords + 0.5, size)
        labels = point_labels.round().long()
        embedding = torch.where((labels == -1).unsqueeze(-1), torch.zeros_like(embedding), embedding)
        # rows: not-a-point (label -1), background 0, foreground 1, box top-left 2, box bottom-right 3
        table = torch.cat([prompt.not_a_point_embed.weight] + [e.weight for e in prompt.point_embeddings], dim=0)
        return embedding + table[labels + 1]

    def dense_embedding(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        prompt = self.network.prompt_encoder
        no_mask = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        return has_mask * prompt.mask_downscaling(mask_input) + (1 - has_mask) * no_mask

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        features, (point_coords, point_labels, mask_input, has_mask_input) = (
            inputs[: self.n_features],
            inputs[self.n_features :],
        )
        embedding = features[0]
        multi_scale = features[1] if self.n_features > 1 else None
        sparse = self.sparse_embedding(point_coords, point_labels)
        dense = self.dense_embedding(mask_input, has_mask_input).expand(embedding.shape[0], -1, -1, -1)
        image_pe = self.network.prompt_encoder.get_dense_pe()
        return self.network.mask_decoder(embedding, image_pe, sparse, dense, multi_scale)
