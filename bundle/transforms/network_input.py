"""The last preprocessing step of a training or evaluation pipeline: a network's input, made as its weights expect."""

from __future__ import annotations

from monai.config import KeysCollection
from monai.transforms import Compose
from monai.utils import ensure_tuple


class NetworkInputd(Compose):
    """Image in [0, 255] (3 channels) and its labels -> ``network``'s input.

    Args:
        keys: the image key first, then label keys (resized with ``label_mode``, exact for masks).
        network: the network the data is for (a :class:`bundle.networks.SAMUNet` or any runtime with
            ``frame_transforms``); its pixel normalisation and image size decide the steps. Only the transforms are
            kept, so the dataset does not hold (or pickle) the network.
        label_mode: MONAI ``Resize`` mode for the labels.
        frame: ``True``: the ``S`` x ``S`` network frame (longest side resized to ``S``, padding bottom/right, then or
            before it the pixel scaling), the input of whole-image inference. ``False``: the pixel scaling alone, at
            the image's own resolution (a 2D image or a volume), labels untouched: the input that sliding-window
            inference and window training cut ``S`` x ``S`` windows from.

    A ``Compose``, so MONAI's ``Invertd`` inverts the frame step through it.
    """

    def __init__(self, keys: KeysCollection, network, label_mode: str = "nearest-exact", frame: bool = True) -> None:
        image_key, *label_keys = ensure_tuple(keys)
        self.frame = frame
        if frame:
            super().__init__(network.frame_transforms(image_key, label_keys, label_mode))
        else:
            super().__init__(network.pixel_transforms(image_key))

    def inverse(self, data):
        # the pixel scaling alone has nothing to invert (MONAI's Compose would warn that it has no invertible step)
        return super().inverse(data) if self.frame else dict(data)
