"""Prompt simulation over a whole batch of masks, for the training and evaluation loops.

Initial prompts (boxes, points) come from the data pipeline's samplers (`bundle.transforms.box_from_mask`,
`bundle.transforms.sample_points`), called once per mask per iteration. Corrective clicks are drawn inside the
interactive loop at every step for every mask, on the device where the predictions are, so this module has a
batched torch version of `bundle.transforms.corrective_click` (``mode="random"``: a uniform pixel of the error
region; label 1 on a false negative, 0 on a false positive; -1 padding when there is no error).

Coordinates are pixel coordinates of the network frame, x then y; masks are ``[N, 1, H, W]`` or ``[N, H, W]``.
"""

from __future__ import annotations

import numpy as np
import torch

from bundle.transforms import box_from_mask, frame_shape, protocol_click, sample_points

__all__ = ["initial_prompts", "corrective_clicks", "deepest_clicks", "valid_region"]


def _flat(masks: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` or ``[N, H, W]`` -> boolean ``[N, H, W]``."""
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, 1, H, W] or [N, H, W], got {tuple(masks.shape)}")
    return masks > 0.5 if masks.is_floating_point() else masks.bool()


def valid_region(original_hw, n: int, shape: tuple[int, int], device) -> torch.Tensor:
    """Boolean ``[n, H, W]``: the image content of each network-frame image (not the bottom/right padding).

    ``original_hw`` is the batch's ``original_hw`` (``[n, 2]`` or a pair of ``[n]`` tensors after collation, as
    `bundle.transforms.ToNetworkFramed` stores it) or None (everything valid).
    """
    height, width = shape
    if original_hw is None:
        return torch.ones(n, height, width, dtype=torch.bool, device=device)
    if isinstance(original_hw, (list, tuple)) and len(original_hw) == 2 and torch.as_tensor(original_hw[0]).ndim == 1:
        original_hw = torch.stack([torch.as_tensor(v) for v in original_hw], dim=1)  # default_collate of (h, w) pairs
    hw = torch.as_tensor(original_hw).reshape(n, 2).tolist()
    sizes = torch.tensor([frame_shape(p, max(height, width)) for p in hw], device=device)
    rows = torch.arange(height, device=device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(width, device=device)[None, None, :] < sizes[:, 1, None, None]
    return rows & cols


def initial_prompts(
    masks: torch.Tensor,
    mode: str,
    rng: np.random.RandomState,
    num_points: int = 1,
    jitter: int = 0,
    box_mode: str = "sam_unet",
) -> dict[str, torch.Tensor]:
    """Prompt kwargs for ``SAMUNet.decode_low_res``: ``{"boxes": [N, 4]}`` or ``{"points": [N, P, 2], "point_labels"}``.

    ``mode`` is ``"box"`` (largest component, ``jitter`` px, `bundle.transforms.box_from_mask`) or ``"points"``
    (``num_points`` points with SAM-Med2D's foreground/background mix, `bundle.transforms.sample_points`).
    Every mask must be non-empty (the samplers raise ValueError naming the mask otherwise).
    """
    flat = _flat(masks).cpu().numpy()
    device = masks.device
    if mode == "box":
        boxes = [box_from_mask(m, jitter=jitter, mode=box_mode, rng=rng, name=f"mask {i}") for i, m in enumerate(flat)]
        return {"boxes": torch.as_tensor(np.stack(boxes), dtype=torch.float32, device=device)}
    if mode == "points":
        pairs = [sample_points(m, num_points, rng=rng, name=f"mask {i}") for i, m in enumerate(flat)]
        return {
            "points": torch.as_tensor(np.stack([p for p, _ in pairs]), dtype=torch.float32, device=device),
            "point_labels": torch.as_tensor(np.stack([lab for _, lab in pairs]), dtype=torch.long, device=device),
        }
    raise ValueError(f"prompt mode {mode!r}: expected 'box' or 'points'")


def corrective_clicks(
    pred: torch.Tensor,
    masks: torch.Tensor,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per mask, uniform over the error region ``pred != mask`` (inside ``valid``).

    The label is the ground truth at the click (1: missed foreground, 0: false positive); no error gives a
    padding point ``(0, 0)`` with label -1. Returns points ``[N, 1, 2]`` (x, y, float) and labels ``[N, 1]``.
    ``uniform`` (``[N]`` numbers in [0, 1), one per mask) picks the click by inverse CDF instead of drawing from
    ``generator``, so a mask's click does not depend on which other masks share the call (training splits a batch
    into micro-batches).
    """
    gt, pr = _flat(masks), _flat(pred)
    error = gt != pr
    if valid is not None:
        error &= valid
    n, _, width = error.shape
    weights = error.flatten(1).float()
    found = weights.sum(dim=1) > 0
    weights[~found] = 1.0
    if uniform is None:
        draws = torch.multinomial(weights.cpu(), 1, generator=generator).to(error.device)[:, 0]
    else:
        cdf = weights.cumsum(dim=1)  # exact: integer counts below 2**24
        target = uniform.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
        draws = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=cdf.shape[1] - 1)
    xy = torch.stack([draws % width, draws // width], dim=-1).float()
    labels = gt.flatten(1).gather(1, draws[:, None]).long()[:, 0]
    labels = torch.where(found, labels, torch.full_like(labels, -1))
    xy[~found] = 0.0
    return xy[:, None], labels[:, None]


def deepest_clicks(
    pred: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The interactive protocol's click per mask (:func:`bundle.transforms.protocol_click`: the point farthest inside
    the largest connected error region, inside ``valid``), as :func:`corrective_clicks` returns clicks: points
    ``[N, 1, 2]`` (x, y) and labels ``[N, 1]`` (1 on a miss, 0 on a false positive, -1 padding where nothing is wrong).
    """
    gt, pr = _flat(masks), _flat(pred)
    if valid is not None:
        pr = pr & valid  # a prediction in the padding is cropped away at inference: not an error to click on
    xy = torch.zeros(gt.shape[0], 1, 2)
    labels = torch.full((gt.shape[0], 1), -1, dtype=torch.long)
    for i, (p, g) in enumerate(zip(pr.cpu().numpy(), gt.cpu().numpy())):
        index, label = protocol_click(p, g)
        if index is not None:
            xy[i, 0] = torch.tensor([index[1], index[0]], dtype=torch.float32)  # (row, column) -> (x, y)
            labels[i, 0] = label
    return xy.to(pred.device), labels.to(pred.device)
