"""The network's view of an array: its two in-plane axes swapped, so the network sees an image upright.

MONAI ``LoadImage`` returns a 2D image x first (``[C, W, H]``, columns first) and a volume as ``[C, i, j, k]``;
the network takes rows first. Swapping the in-plane axes shows a 2D image upright, and a volume's axial slice with
rows = ``j`` (the radiological display).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from monai.transforms import Transpose, Transposed

__all__ = ["TransposeInPlaned"]


class TransposeInPlaned(Transposed):
    """Swap the first two spatial axes of ``[C, a, b]`` or ``[C, a, b, k]`` arrays; invertible (MONAI ``Invertd``).

    MONAI's ``Transposed`` takes one fixed axis order; this picks it per array, so one pipeline serves 2D images and
    volumes. Like ``Transposed`` it leaves the affine as it is: apply it after affine-dependent transforms
    (``Spacingd``).
    """

    def __init__(self, keys, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, indices=None, allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            ndim = d[key].ndim
            if ndim not in (3, 4):
                raise ValueError(f"{key}: shape {tuple(d[key].shape)}; expected [C, a, b] or [C, a, b, k]")
            indices = (0, 2, 1, *range(3, ndim))
            d[key] = Transpose(indices)(d[key])
            self.push_transform(d, key, extra_info={"indices": indices})
        return d
