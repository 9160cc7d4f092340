"""A constructed prompt-following segmenter with the network interface, for tests of the inference machinery
without trained weights.

:class:`BrightObjectNet` segments the pixels brighter than ``threshold`` (in the network's normalised input) that lie
inside the box prompt, or, with clicks only, the bright connected component under the foreground clicks. Its output
is exact at network-frame resolution, so tests can check where prompts land and where propagation stops.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn

from bundle.networks.interface import PromptableNetworkMixin


class BrightObjectNet(PromptableNetworkMixin, nn.Module):
    """Constructed network: ``encode`` keeps the image, ``decode_low_res`` thresholds it within the prompt.

    Its input is scaled as LiteMedSAM's (min-max of each frame to [0, 1]), so ``threshold`` is relative to each
    slice's intensity range."""

    pixel_normalization = "litemedsam"

    def __init__(self, image_size: int = 256, threshold: float = 0.5) -> None:
        super().__init__()
        self.image_size = image_size
        self.mask_input_size = image_size // 4
        self.threshold = threshold
        self.backbone = "constructed"
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the module a device
        self.encode_calls = 0
        self.encoded_images = 0

    def encode(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        self.encode_calls += 1
        self.encoded_images += image.shape[0]
        return {"embedding": image[:, :1].float() + 0 * self.dummy}

    def decode_low_res(self, features, boxes=None, points=None, point_labels=None, mask_inputs=None, image_index=None):
        embedding = features["embedding"]
        n = max(len(t) for t in (boxes, points, [0] * embedding.shape[0]) if t is not None)
        index = torch.arange(n) if image_index is None else torch.as_tensor(image_index)
        bright = (embedding[index, 0] > self.threshold).cpu().numpy()  # [N, S, S]
        out = np.zeros_like(bright)
        size = self.image_size
        for row in range(n):
            keep = bright[row]
            if boxes is not None:
                x0, y0, x1, y1 = (float(v) for v in boxes[row])
                region = np.zeros_like(keep)
                region[int(np.ceil(y0)) : int(np.floor(y1)) + 1, int(np.ceil(x0)) : int(np.floor(x1)) + 1] = True
                keep = keep & region
            elif points is not None:
                from scipy import ndimage

                labels, _ = ndimage.label(keep)
                chosen = {
                    labels[int(round(float(y))), int(round(float(x)))]
                    for (x, y), lab in zip(points[row].tolist(), point_labels[row].tolist())
                    if lab == 1
                } - {0}
                keep = np.isin(labels, list(chosen)) if chosen else np.zeros_like(keep)
            else:
                keep = keep & np.ones((size, size), dtype=bool)
            out[row] = keep
        logits = torch.from_numpy(np.where(out, 10.0, -10.0)).float()[:, None]
        return logits.to(embedding.device)


class CentreWeightedNet(BrightObjectNet):
    """:class:`BrightObjectNet` whose foreground logits fall with the distance from the box centre (10 at the centre,
    0.5 at the corners), so where two objects' masks overlap the one whose box centre is nearer is more probable.
    It records the ``mask_inputs`` it is given (``None`` for a call without)."""

    def __init__(self, image_size: int = 256, threshold: float = 0.5) -> None:
        super().__init__(image_size, threshold)
        self.mask_inputs_seen: list[torch.Tensor | None] = []

    def decode_low_res(self, features, boxes=None, points=None, point_labels=None, mask_inputs=None, image_index=None):
        self.mask_inputs_seen.append(None if mask_inputs is None else mask_inputs.detach().cpu().clone())
        logits = super().decode_low_res(features, boxes, points, point_labels, mask_inputs, image_index)
        if boxes is None:
            return logits
        y, x = torch.meshgrid(torch.arange(self.image_size), torch.arange(self.image_size), indexing="ij")
        boxes = torch.as_tensor(boxes, dtype=torch.float32).cpu()
        centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        half = torch.hypot(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2 + 1
        distance = torch.hypot(x[None] - centre_x[:, None, None], y[None] - centre_y[:, None, None])
        weight = (10.0 * (1 - distance / half[:, None, None])).clamp(min=0.5)[:, None].to(logits.device)
        return torch.where(logits > 0, weight, logits)


#: the two-sphere test volume: array [i, j, k] as LoadImage returns it, two bright spheres on slices ~4-12
SHAPE = (64, 96, 16)
CENTRES = ((20, 30, 8), (44, 66, 8))


def two_spheres(shape=SHAPE, centres=CENTRES, radius=9.0):
    """A [0, 255] volume with two bright ellipsoids (200 on 20), and their masks."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    masks = [np.sqrt((((grid - c) * [1, 1, 2]) ** 2).sum(-1)) < radius for c in centres]
    return np.where(masks[0] | masks[1], 200.0, 20.0).astype(np.float32), masks


def write_spheres(path):
    """The two spheres as a CT NIfTI (300 / -800 HU); returns their masks."""
    volume, masks = two_spheres()
    hu = np.where(volume > 100, 300, -800).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
    return masks


class ClickFollowingNet(BrightObjectNet):
    """:class:`BrightObjectNet` that also follows clicks beside a box: a foreground click adds the bright connected
    component under it, a background click removes the one under it. With ``spill`` every prompt that holds clicks
    also switches on a square in the frame's top-left corner, far from any click: the global change a box-trained
    decoder makes when it is given clicks. Every ``mask_inputs`` it receives is recorded in ``mask_inputs_seen``."""

    def __init__(self, image_size: int = 256, threshold: float = 0.5, spill: bool = False) -> None:
        super().__init__(image_size, threshold)
        self.spill = spill
        self.mask_inputs_seen: list = []

    def decode_low_res(self, features, boxes=None, points=None, point_labels=None, mask_inputs=None, image_index=None):
        from scipy import ndimage

        self.mask_inputs_seen.append(None if mask_inputs is None else mask_inputs.clone())
        logits = super().decode_low_res(features, boxes, points, point_labels, mask_inputs, image_index)
        if points is None:
            return logits
        embedding = features["embedding"]
        index = torch.arange(len(points)) if image_index is None else torch.as_tensor(image_index)
        out = (logits[:, 0] > 0).cpu().numpy()
        for row in range(len(points)):
            labels, _ = ndimage.label((embedding[index[row], 0] > self.threshold).cpu().numpy())
            for (x, y), lab in zip(points[row].tolist(), point_labels[row].tolist()):
                component = labels[int(round(float(y))), int(round(float(x)))]
                if lab >= 0 and component:
                    out[row][labels == component] = bool(lab)
            if self.spill and (point_labels[row] >= 0).any():
                out[row][:8, :8] = True
        return torch.from_numpy(np.where(out, 10.0, -10.0)).float()[:, None].to(embedding.device)
