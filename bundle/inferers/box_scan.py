"""A click turned into a box: boxes of growing size centred on the click, the most stable mask kept.

Box-trained weights (LiteMedSAM) were never shown a click without a box: decoded as a point prompt it gives a mask of
a few pixels. They do segment whatever object a box frames, so a click alone is decoded with a range of square boxes
centred on it (:data:`SIDES`, network pixels) in one batched decode. Each box's mask (the component holding the
click) can be decoded again with its own tight box (:func:`tight_box`): a mask of an object comes back (intersection
over union at least :data:`MIN_CONSISTENCY`), a blob cut out of a larger object or of the background by a box too
small or too large mostly does not. Of the masks that come back, the one with the highest stability score is kept
(of all masks when none comes back); the masks are checked most stable first, a few per batched decode, until one
comes back. The stability score is SAM's (its automatic mask generator's): the area above logit ``+offset`` over
the area above ``-offset``; a box that cuts through an object or frames mostly background gives soft edges, a box
around the object gives a crisp one. Sizes, offset, the component rule and the consistency bound were chosen on the
tuning images (docs/benchmarks.md), not on the images the figures come from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .corrections import component_at

#: box sides in network pixels of a 256 frame: 16 x 1.25^n, then the whole frame (the smallest frame a lung nodule)
SIDES = (16, 20, 25, 31, 39, 49, 61, 76, 95, 119, 149, 186, 233, 256)
#: logit offset of the stability score
OFFSET = 0.5
#: least intersection over union of a mask with the mask its tight box gives, for the mask to be an object
MIN_CONSISTENCY = 0.8
#: margin of a tight box, as a share of the mask's extent on each axis
MARGIN = 0.1
#: masks checked against their tight boxes in one decode, the most stable first
CHECKED_AT_ONCE = 4


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


def tight_box(mask: np.ndarray, shape: Sequence[int], margin: float = MARGIN) -> tuple[int, int, int, int]:
    """The bounding box ``(a0, b0, a1, b1)`` of ``mask`` widened by ``margin`` of its extent (at least one voxel)
    on each side, clipped to the slice ``shape``."""
    a, b = np.nonzero(mask)
    grow_a = max(1, int(margin * (a.max() - a.min() + 1)))
    grow_b = max(1, int(margin * (b.max() - b.min() + 1)))
    return (
        max(0, int(a.min()) - grow_a),
        max(0, int(b.min()) - grow_b),
        min(shape[0] - 1, int(a.max()) + grow_a),
        min(shape[1] - 1, int(b.max()) + grow_b),
    )


def consistency(mask: np.ndarray, again: np.ndarray) -> float:
    """Intersection over union of ``mask`` and ``again`` (the mask its tight box gave)."""
    return float((mask & again).sum() / max(1, (mask | again).sum()))


def pick_box(
    logits: torch.Tensor, point: Sequence[int], comes_back: Callable[[list[np.ndarray]], list[bool]] | None = None
) -> tuple[int, np.ndarray]:
    """The index of the most stable of the boxes' slice logits ``[N, A, B]`` whose mask comes back from its tight
    box (the most stable of all when none does, or without ``comes_back``), and its mask ``[A, B]`` (the component
    of its mask that holds ``point``; empty when no box's mask holds it).

    ``comes_back(masks)`` says for each mask ``[A, B]`` whether it comes back; it is asked in order of stability,
    :data:`CHECKED_AT_ONCE` masks at a time, until one does (a decode per call: most clicks need one)."""
    rows = logits.float().cpu().numpy()
    scores = [stability(row, point) for row in rows]
    order = [j for j in sorted(range(len(rows)), key=lambda j: -scores[j]) if scores[j] >= 0]
    if not order:
        return 0, np.zeros(rows.shape[1:], dtype=bool)
    masks = {}
    for begin in range(0, len(order) if comes_back is not None else 0, CHECKED_AT_ONCE):
        chunk = order[begin : begin + CHECKED_AT_ONCE]
        masks.update((j, component_at(rows[j] > 0, point)) for j in chunk)
        back = [j for j, ok in zip(chunk, comes_back([masks[j] for j in chunk])) if ok]
        if back:
            return back[0], masks[back[0]]
    best = order[0]
    return best, masks[best] if best in masks else component_at(rows[best] > 0, point)
