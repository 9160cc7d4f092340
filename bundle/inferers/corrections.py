"""Click handling rules: how a corrective click changes a mask, beyond passing it to the decoder as a point.

Box-trained weights (LiteMedSAM) were never shown clicks: a click beside the box moves the whole mask, often for
the worse. These rules keep what the user did not ask to change (each one is a switch of
:class:`bundle.inferers.PromptedSliceInferer`, measured in docs/benchmarks.md):

- :func:`merge_click` (``click_merge="local"``): a click changes only the part of the decoder's new mask that is
  connected to it: a foreground click adds the new region that holds it, a background click removes the region of
  the old mask that holds it;
- :func:`grow_box`: a foreground click outside the box grows the box to hold it;
- :func:`drop_rejected_components`: a connected component (3D in a volume) that holds a background click and no
  foreground click is removed.

Connectivity is full (8 neighbours in 2D, 26 in 3D), as :func:`bundle.transforms.largest_component`. Points are
in-plane voxel indices ``(a, b)`` of the slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def component_at(mask: np.ndarray, index: Sequence[int]) -> np.ndarray | None:
    """The connected component of ``mask`` that holds ``index`` (``None`` if ``mask`` is off there)."""
    index = tuple(int(v) for v in index)
    if not mask[index]:
        return None
    labels, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    return labels == labels[index]


def merge_click(
    previous: np.ndarray,
    candidate: np.ndarray,
    point: Sequence[int],
    label: int,
    foreground: Sequence = (),
    max_change: float = 0.5,
) -> np.ndarray:
    """The slice mask after one click: ``previous`` changed only where ``candidate`` (the decoder's mask for the
    prompt with this click) differs from it in the region connected to the click.

    A foreground click (``label`` 1) outside ``previous`` adds the component of ``candidate & ~previous`` that
    holds it; a background click (0) inside ``previous`` removes the component of ``previous & ~candidate`` that
    holds it. When the decoder did not change the clicked pixel, a background click still removes the component of
    ``previous`` that holds it if that component has none of the ``foreground`` clicks (the user said that blob is
    not the object); otherwise nothing changes. A removal of more than ``max_change`` of the area of ``previous`` is
    not made: a box-trained decoder given a background click may drop the whole mask, and one click corrects a part.
    """
    previous = np.asarray(previous, dtype=bool)
    point = tuple(int(v) for v in point)
    if label == 1:
        if previous[point]:
            return previous
        added = component_at(candidate & ~previous, point)
        return previous if added is None else previous | added
    if not previous[point]:
        return previous
    removed = component_at(previous & ~candidate, point)
    if removed is None:
        blob = component_at(previous, point)
        if any(blob[tuple(int(v) for v in p)] for p in foreground):
            return previous
        removed = blob
    return previous if removed.sum() > max_change * previous.sum() else previous & ~removed


def grow_box(box, points: Sequence, labels: Sequence[int], grow: int, shape: Sequence[int]):
    """``box`` ``(a0, b0, a1, b1)`` grown to hold every foreground point outside it plus ``grow`` voxels (clipped
    to the slice ``shape``); unchanged when all foreground points lie inside."""
    if box is None:
        return None
    a0, b0, a1, b1 = box
    for (a, b), label in zip(points, labels):
        if label != 1 or (a0 <= a <= a1 and b0 <= b <= b1):
            continue
        a0, a1 = (max(0, a - grow), a1) if a < a0 else (a0, min(shape[0] - 1, a + grow)) if a > a1 else (a0, a1)
        b0, b1 = (max(0, b - grow), b1) if b < b0 else (b0, min(shape[1] - 1, b + grow)) if b > b1 else (b0, b1)
    return (int(a0), int(b0), int(a1), int(b1))


def drop_rejected_components(mask: np.ndarray, clicks: Sequence[tuple[Sequence[int], int]]) -> np.ndarray:
    """``mask`` without the connected components that hold a background click and no foreground click.

    ``clicks`` are ``(index, label)`` pairs with ``index`` a full index of ``mask`` (``(a, b, k)`` for a slice
    stack ``[A, B, K]``). Components are 3D for a stack (a false positive that spans slices goes as a whole).
    """
    background = [tuple(int(v) for v in p) for p, label in clicks if label == 0]
    if not background or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    rejected = {int(labels[p]) for p in background} - {0}
    rejected -= {int(labels[tuple(int(v) for v in p)]) for p, label in clicks if label == 1}
    if not rejected:
        return mask
    return mask & ~np.isin(labels, sorted(rejected))
