"""Sliding-window inference at an image's own resolution: prompt-free over whole images and volumes, and a box
prompt over the windows it covers.

Whole-image inference resizes an image so that its longest side is the network's ``S`` (256). Windows keep the
pixels: the image (at its own or a chosen resolution) is scaled as the network expects
(:meth:`~bundle.networks.interface.PromptableNetwork.scale_pixels`) and cut into ``S x S`` windows by MONAI's
``sliding_window_inference``; overlapping windows are blended (gaussian weights by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import SliceInferer, SlidingWindowInfererAdapt, sliding_window_inference

from bundle.networks.interface import PromptableNetwork

__all__ = ["SlidingWindowSliceInferer", "BoxWindowInferer", "BACKGROUND_LOGIT"]

#: logit given to pixels no window covers (and to windows the box does not reach)
BACKGROUND_LOGIT = -20.0


class SlidingWindowSliceInferer(SliceInferer, SlidingWindowInfererAdapt):
    """A 2D network over a 2D image ``[N, C, H, W]`` (MONAI ``SlidingWindowInfererAdapt``) or over every slice of a
    volume ``[N, C, H, W, D]`` along ``spatial_dim`` (MONAI ``SliceInferer``), with one set of arguments.

    MONAI's ``SliceInferer`` refuses 2D inputs and ``SlidingWindowInferer`` cannot run a 2D network over a volume;
    one bundle config (``configs/inference_auto.json``) serves both, so this dispatches on the input's dimensions.
    An image (or slice) smaller than a window is zero-padded at the bottom/right, as the network frame pads (MONAI
    would pad both sides), and the output cropped back: an image whose longest side is the window gets exactly the
    whole-image path's input. On CUDA, with ``device=None``, stitching falls back to buffered and then to CPU
    stitching on out-of-memory (``SlidingWindowInfererAdapt``). Arguments are ``SlidingWindowInferer``'s;
    ``roi_size`` is 2D.
    """

    def __init__(self, roi_size: Sequence[int] = (256, 256), spatial_dim: int = 2, **kwargs) -> None:
        if len(tuple(roi_size)) != 2:
            raise ValueError(f"roi_size must be 2D (height, width) for a 2D network, got {roi_size!r}")
        super().__init__(spatial_dim=spatial_dim, roi_size=tuple(roi_size), **kwargs)

    def _in_plane(self, ndim: int) -> list[int]:
        """Tensor dimensions of the window's rows and columns."""
        spatial = list(range(2, ndim))
        if ndim == 5:
            spatial.pop(self.spatial_dim)
        return spatial

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if inputs.ndim not in (4, 5):
            raise ValueError(
                f"inputs must be a batch of 2D images [N, C, H, W] or volumes [N, C, H, W, D], got {tuple(inputs.shape)}"
            )
        dims = self._in_plane(inputs.ndim)
        sizes = [inputs.shape[d] for d in dims]
        pad = [0] * (2 * (inputs.ndim - 2))
        for d, size, window in zip(dims, sizes, self.orig_roi_size):
            # F.pad takes (before, after) pairs from the last dimension backwards
            pad[2 * (inputs.ndim - 1 - d) + 1] = max(0, int(window) - size)
        padded = F.pad(inputs, pad, value=self.cval) if any(pad) else inputs
        if inputs.ndim == 4:
            self.roi_size = self.orig_roi_size
            out = SlidingWindowInfererAdapt.__call__(self, padded, network, *args, **kwargs)
        else:
            out = super().__call__(padded, network, *args, **kwargs)
        if any(pad):
            crop = [slice(None)] * inputs.ndim
            for d, size in zip(dims, sizes):
                crop[d] = slice(0, size)
            out = out[tuple(crop)]
        return out


def _clip_box(box: Sequence[float], origin: Sequence[int], size: int) -> list[float] | None:
    """``box`` (x0, y0, x1, y1, inclusive pixels) in the coordinates of a ``size`` window at ``origin`` (y, x),
    clipped to it; ``None`` when they do not overlap."""
    oy, ox = origin
    x0, y0, x1, y1 = box[0] - ox, box[1] - oy, box[2] - ox, box[3] - oy
    if x1 < 0 or y1 < 0 or x0 > size - 1 or y0 > size - 1:
        return None
    return [min(max(v, 0.0), size - 1.0) for v in (x0, y0, x1, y1)]


class BoxWindowInferer:
    """A box prompt on an image larger than the network's window, segmented at the image's own (or a chosen)
    resolution over the windows the box covers, the box clipped to each window, the windows blended.

    Args:
        network: a :class:`~bundle.networks.interface.PromptableNetwork` (its ``image_size`` is the window).
        overlap: window overlap for MONAI's ``sliding_window_inference``.
        mode: blending, ``"gaussian"`` (window centres count most) or ``"constant"``.
        sw_batch_size: windows encoded per network call.
        context: pixels (at the working resolution) kept around the box, so windows see the object's surroundings.
        device: where the windows run (default: the network's device); the stitched logits stay on the CPU.

    ``__call__(image, box, scale)``: ``image [C, H, W]`` (C = 1 or 3) in [0, 255] as the network sees it (rows,
    columns), ``box`` ``(x0, y0, x1, y1)`` inclusive pixel indices of it, ``scale`` the working resolution (1 = the
    image's pixels, 0.5 = half). Returns logits ``[H, W]``. The crop of the image around the box (at least one
    window each way; an image smaller than a window is zero-padded at the bottom/right first, as the network frame
    pads) goes through ``sliding_window_inference(..., with_coord=True)``, which hands each batch of windows to the
    predictor with their slices in the crop's coordinates; each window gets the box clipped to it, windows the box
    misses get :data:`BACKGROUND_LOGIT` without running the network. An image that fits one window at ``scale``
    with its longest side equal to the window is exactly the whole-image path.
    """

    def __init__(
        self,
        network: PromptableNetwork,
        overlap: float = 0.25,
        mode: str = "gaussian",
        sw_batch_size: int = 4,
        context: int = 32,
        device: str | torch.device | None = None,
    ) -> None:
        self.network = network
        self.size = int(network.image_size)
        self.overlap = float(overlap)
        self.mode = mode
        self.sw_batch_size = int(sw_batch_size)
        self.context = int(context)
        if device is None:
            device = next((p.device for p in network.parameters()), torch.device("cpu"))
        self.device = torch.device(device)
        self.windows_run = 0

    def region(self, box: Sequence[float], hw: Sequence[int]) -> tuple[int, int, int, int]:
        """Rows ``y0:y1`` and columns ``x0:x1`` of an ``hw`` image that hold ``box`` plus ``context``, at least one
        window each way where the image allows."""
        bounds = []
        for lo, hi, extent in ((box[1], box[3], hw[0]), (box[0], box[2], hw[1])):
            start, stop = math.floor(lo) - self.context, math.ceil(hi) + 1 + self.context
            missing = self.size - (stop - start)
            if missing > 0:
                start, stop = start - missing // 2, stop + missing - missing // 2
            shift = max(0, -start) - max(0, stop - extent)
            start, stop = max(0, start + shift), min(extent, stop + shift)
            bounds.append((start, stop))
        (y0, y1), (x0, x1) = bounds
        return y0, y1, x0, x1

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, box: Sequence[float], scale: float = 1.0) -> torch.Tensor:
        image = torch.as_tensor(image, dtype=torch.float32)
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image must be [1 or 3, H, W] in [0, 255], got shape {tuple(image.shape)}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        height, width = image.shape[-2:]
        work = image
        if scale != 1.0:
            work_hw = (max(1, round(height * scale)), max(1, round(width * scale)))
            work = F.interpolate(image[None], work_hw, mode="bilinear", antialias=scale < 1, align_corners=False)[0]
        fy, fx = work.shape[-2] / height, work.shape[-1] / width
        scaled = [float(v) * f for v, f in zip(box, (fx, fy, fx, fy))]  # as the network frame scales coordinates
        pixels = self.network.scale_pixels(work[None])[0]
        work_hw = tuple(pixels.shape[-2:])
        # zero padding at the bottom/right up to one window, as the network frame pads (0 in normalised space), so
        # an image that is one window gets exactly the whole-image path's input and MONAI never pads
        pixels = F.pad(pixels, (0, max(0, self.size - work_hw[1]), 0, max(0, self.size - work_hw[0])))
        y0, y1, x0, x1 = self.region(scaled, pixels.shape[-2:])
        crop = pixels[:, y0:y1, x0:x1]

        def predictor(windows: torch.Tensor, slices: list) -> torch.Tensor:
            out = torch.full((windows.shape[0], 1, self.size, self.size), BACKGROUND_LOGIT, device=windows.device)
            boxes = []
            for s in slices:  # [batch, channels, rows, columns] of each window in the crop
                boxes.append(_clip_box(scaled, (y0 + s[2].start, x0 + s[3].start), self.size))
            hit = [n for n, b in enumerate(boxes) if b is not None]
            if hit:
                features = self.network.encode(windows[hit].to(self.device))
                logits = self.network.decode(features, boxes=torch.tensor([boxes[n] for n in hit]))
                out[hit] = logits.float().to(out.device)
                self.windows_run += len(hit)
            return out

        blended = sliding_window_inference(
            crop[None],
            self.size,
            self.sw_batch_size,
            predictor,
            overlap=self.overlap,
            mode=self.mode,
            sw_device=self.device,
            device=torch.device("cpu"),
            with_coord=True,
        )[0, 0]
        logits = torch.full(tuple(pixels.shape[-2:]), BACKGROUND_LOGIT)
        logits[y0:y1, x0:x1] = blended
        logits = logits[: work_hw[0], : work_hw[1]]
        if scale != 1.0:
            logits = F.interpolate(logits[None, None], (height, width), mode="bilinear", align_corners=False)[0, 0]
        return logits
