"""A click turned into a box: boxes of growing size centred on the click, the most stable mask kept.

Box-trained weights (LiteMedSAM) were never shown a click without a box: decoded as a point prompt it gives a mask of
a few pixels. They do segment whatever object a box frames, so a click alone is decoded with a range of square boxes
centred on it (:data:`SIDES`, network pixels) in one batched decode, and the box whose mask (the component holding
the click) has the highest stability score is kept. The stability score is SAM's (its automatic mask generator's):
the area above logit ``+offset`` over the area above ``-offset``; a box that cuts through an object or frames mostly
background gives soft edges, a box around the object gives a crisp one. Sizes, offset and the component rule were
chosen on the tuning images (docs/benchmarks.md), not on the images the figures come from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .corrections import component_at

#: box sides in network pixels of a 256 frame: 16 x 1.25^n from 32 on, then the whole frame
SIDES = (39, 49, 61, 76, 95, 119, 149, 186, 233, 256)
#: logit offset of the stability score
OFFSET = 0.5


def centred_boxes(point: Sequence[int], scale: float, shape: Sequence[int], size: int = 256) -> list[tuple]:
    """Square boxes ``(a0, b0, a1, b1)`` of :data:`SIDES` network pixels (``scale`` network pixels per slice voxel,
    sides scaled to a network of ``size``) centred on ``point``, clipped to the slice ``shape``; duplicates dropped."""
    a, b = (int(v) for v in point)
    boxes = []
    for side in SIDES:
        half = side * size / 256 / scale / 2
        box = (
            max(0, int(a - half)),
            max(0, int(b - half)),
            min(shape[0] - 1, int(a + half)),
            min(shape[1] - 1, int(b + half)),
        )
        if box not in boxes:
            boxes.append(box)
    return boxes


def stability(logits: np.ndarray, point: Sequence[int], offset: float = OFFSET) -> float:
    """Stability score of the mask component holding ``point`` in slice logits ``[A, B]``: within the component of
    ``logits > -offset`` holding the point, the share above ``+offset``; ``-1`` when the mask misses the point."""
    point = tuple(int(v) for v in point)
    if logits[point] <= 0:
        return -1.0
    region = component_at(logits > -offset, point)
    return float((logits[region] > offset).sum() / region.sum())


def pick_box(logits: torch.Tensor, point: Sequence[int]) -> tuple[int, np.ndarray]:
    """The index of the most stable of the boxes' slice logits ``[N, A, B]``, and its mask ``[A, B]``
    (the component of its mask that holds ``point``; empty when no box's mask holds it)."""
    rows = logits.float().cpu().numpy()
    scores = [stability(row, point) for row in rows]
    best = int(np.argmax(scores))
    if scores[best] < 0:
        return best, np.zeros(rows.shape[1:], dtype=bool)
    return best, component_at(rows[best] > 0, point)
