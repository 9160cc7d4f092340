"""One prompted forward pass with simulated interaction: encode once, decode the first prompt, then k corrective steps."""

from __future__ import annotations

import torch
import torch.nn as nn

from bundle.networks.interface import PromptableNetwork

from .prompts import corrective_clicks

__all__ = ["InteractiveDecoding"]


class InteractiveDecoding(nn.Module):
    """Runs SAMUNet the SAM-Med2D way for one batch and returns the low-res logits of every step.

    ``forward`` encodes the images ONCE, decodes the initial prompt (boxes and/or points), then for each of
    ``iterations`` steps adds one corrective click per mask, sampled from the error region of the previous prediction
    (false negative -> foreground click, false positive -> background click), and feeds the previous low-res logits
    back as ``mask_inputs``. Clicks accumulate across steps; an initial box is kept. ``features`` (from
    ``network.encode(image)``) skips the encoder, so an evaluator encodes once for every prompt mode.

    This is an ``nn.Module`` so that DistributedDataParallel can wrap the whole step (one forward, one backward:
    gradients of all steps are reduced together), while ``network`` itself stays a plain SAMUNet for checkpoints.
    """

    def __init__(self, network: PromptableNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(
        self,
        image: torch.Tensor,
        masks: torch.Tensor,
        image_index: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        iterations: int = 0,
        valid: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        detach_feedback: bool = True,
        features: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        net = self.network
        if features is None:
            features = net.encode(image)
        low = net.decode_low_res(
            features, boxes=boxes, points=points, point_labels=point_labels, image_index=image_index
        )
        outputs = [low]
        for _ in range(iterations):
            with torch.no_grad():
                pred = net.upsample_logits(low.detach().float()) > 0
                region = None if valid is None else valid[image_index]
                click, click_label = corrective_clicks(pred, masks, generator=generator, valid=region)
            points = click if points is None else torch.cat([points, click], dim=1)
            point_labels = click_label if point_labels is None else torch.cat([point_labels, click_label], dim=1)
            feedback = low.detach() if detach_feedback else low
            low = net.decode_low_res(
                features,
                boxes=boxes,
                points=points,
                point_labels=point_labels,
                mask_inputs=feedback.float(),
                image_index=image_index,
            )
            outputs.append(low)
        return outputs
