"""Prompted slice-wise inference over a volume: batched encoding, an embedding cache, 3D boxes and propagation.

Why not MONAI's ``SliceInferer``: it runs one network call per slice over the whole axis with the same inputs, while
prompted inference needs a different prompt per slice, prompts that depend on the previous slice's result
(propagation stops where the mask vanishes, so the set of slices is not known in advance), and the image embedding
split from the prompt decoding so that an encoded slice serves every later click. This inferer batches the encoder
over slices, caches embeddings per ``(image id, axis, slice)`` and decodes prompts per slice.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from bundle.networks.interface import PromptableNetwork

from .cache import EmbeddingCache
from .volume_prompts import PromptPlan, SlicePrompt

logger = logging.getLogger(__name__)


def _is_oom(error: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(error, oom_type)) or "out of memory" in str(error).lower()


def check_intensity_range(slices: np.ndarray, source: str = "volume") -> None:
    """Raise ValueError unless ``slices`` hold [0, 255] intensities (what ``ModalityNormalize`` gives).

    A slice stack within [0, 1] that is not all zero is refused too: it was scaled for a network input already,
    and the box-propagation contrast test (``min_contrast``, in [0, 255] units) would stop on every slice.
    """
    low, high = float(np.min(slices)), float(np.max(slices))
    if not (np.isfinite(low) and np.isfinite(high)) or low < -1e-3 or high > 255.0 + 1e-3:
        raise ValueError(
            f"{source}: intensities must lie in [0, 255] (ModalityNormalize's output), got [{low:.4g}, {high:.4g}]"
        )
    if 0.0 < high <= 1.0:
        raise ValueError(
            f"{source}: intensities lie in [{low:.4g}, {high:.4g}], which looks like a [0, 1] image; the inferer "
            "expects [0, 255] (ModalityNormalize's output): multiply by 255"
        )


def _score(logits: torch.Tensor, mask: np.ndarray) -> float | None:
    """Mean sigmoid probability over the mask (``None`` for an empty mask)."""
    if not mask.any():
        return None
    return float(torch.sigmoid(logits.float().cpu()[torch.from_numpy(mask)]).mean())


@dataclass
class SliceResult:
    """What happened on one slice: its prompt in network-frame coordinates and the mask size."""

    index: int
    box: tuple[float, float, float, float] | None  # in-plane voxel box (a0, b0, a1, b1) that prompted the slice
    points: list[tuple[int, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    area: int = 0
    propagated: bool = False
    contrast: float | None = None  # |mean intensity inside the mask - in a ring around it| ([0, 255] units)
    score: float | None = None  # mean foreground probability inside the mask
    stopped: str = ""  # why propagation ended on this slice ("vanished", "no contrast")


class SliceFrame:
    """Maps one in-plane slice ``[A, B]`` (array axes a, b) to the network frame and back, with the data pipeline's
    frame helpers (:mod:`bundle.transforms.frame`: longest side to ``size``, zero padding bottom/right, coordinates
    scaled as SAM's ``apply_coords``).

    By default the slice is the image ``[H, W] = [A, B]`` (rows = array axis a, network ``y``; columns = axis b,
    network ``x``), as ``bundle.data.volumes.take_slice`` makes training slices and as 2D display images are read.
    With ``transpose`` rows = b and columns = a (the radiological display of an ITK-loaded axial slice).
    """

    def __init__(self, shape: tuple[int, int], size: int, transpose: bool = False) -> None:
        from bundle.transforms.frame import FromNetworkFrame, ToNetworkFrame, frame_shape

        self.shape = (int(shape[0]), int(shape[1]))
        self.size = size
        self.transpose = transpose
        self.hw = (self.shape[1], self.shape[0]) if transpose else self.shape  # image (H, W)
        self.frame_hw = frame_shape(self.hw, size)
        self.scale = self.frame_hw[0] / self.hw[0]
        self._to = ToNetworkFrame(size)
        self._from = FromNetworkFrame(size)

    def to_image(self, slices: torch.Tensor) -> torch.Tensor:
        """``[..., A, B]`` -> ``[..., H, W]`` (the image orientation)."""
        return slices.transpose(-1, -2) if self.transpose else slices

    def _xy(self, ab: np.ndarray) -> np.ndarray:
        return ab if self.transpose else ab[..., ::-1]

    def coords_to_network(self, ab) -> np.ndarray:
        """In-plane voxel coordinates ``[..., 2]`` (a, b) -> network ``(x, y)``."""
        from bundle.transforms.frame import scale_points_to_frame

        xy = scale_points_to_frame(self._xy(np.asarray(ab, dtype=np.float64)), self.hw, self.size)
        return np.clip(xy, 0, self.size - 1)

    def box_to_network(self, box) -> np.ndarray:
        """Inclusive voxel box (a0, b0, a1, b1) -> network XYXY."""
        from bundle.transforms.frame import scale_box_to_frame

        box = np.asarray(box, dtype=np.float64)
        xyxy = np.concatenate([self._xy(box[:2]), self._xy(box[2:])])
        return np.clip(scale_box_to_frame(xyxy, self.hw, self.size), 0, self.size - 1)

    def logits_to_slice(self, logits: torch.Tensor) -> torch.Tensor:
        """Network logits ``[N, 1, size, size]`` -> ``[N, A, B]`` logits on the slice grid."""
        restored = torch.as_tensor(self._from(logits[:, 0].float(), self.hw, mode="bilinear"))
        return self.to_image(restored)


class PromptedSliceInferer:
    """Slice-wise prompted inference with a :class:`bundle.networks.SAMUNet` (any configuration).

    Args:
        network: a :class:`~bundle.networks.interface.PromptableNetwork` (``SAMUNet``, its compiled-encoder or ONNX
            Runtime forms), moved to ``device`` by the caller or here. Its ``preprocess`` scales the slices as its
            weights expect.
        batch_size: slices encoded per network call (bounds memory for volumes of any length); halved on
            out-of-memory down to 1.
        cache: an :class:`EmbeddingCache` shared across calls (a fresh 1 GiB one by default).
        margin: pixels (network frame) added around the previous slice's mask to make the next slice's box.
        min_area: a propagated mask with fewer voxels than this counts as vanished and stops propagation.
        min_contrast: a propagated mask whose mean intensity differs from a ring around it by less than this
            (in the [0, 255] units of the normalised slice) outlines nothing and stops propagation, its slice left
            empty. Box-trained models such as LiteMedSAM draw a blob in any box, even on a uniform region past the
            object's end; this check stops them there. ``0`` disables it.
        amp: mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU.
        device: where to run (default: the network's device).
        transpose_slices: show a volume slice ``[A, B]`` to the network as rows = b, columns = a (the radiological
            display of an ITK-loaded axial slice). Default ``False``: rows = a, as the data pipeline's
            ``bundle.data.volumes.take_slice`` makes the training slices, so inference sees what training saw.

    Input volumes are ``[A, B, K]`` (grey) or ``[3, A, B, K]`` (RGB) float arrays already intensity-normalised to
    [0, 255] for their modality (the data pipeline's ``ModalityNormalize``), with slices along the last axis; a
    volume outside that range (e.g. scaled to [0, 1]) is a ValueError.
    """

    def __init__(
        self,
        network: PromptableNetwork,
        batch_size: int = 8,
        cache: EmbeddingCache | None = None,
        margin: float = 5.0,
        min_area: int = 1,
        min_contrast: float = 10.0,
        amp: bool = True,
        device: str | torch.device | None = None,
        transpose_slices: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.network = network
        self.batch_size = int(batch_size)
        self.cache = cache if cache is not None else EmbeddingCache()
        self.margin = float(margin)
        self.min_area = int(min_area)
        self.min_contrast = float(min_contrast)
        if device is None:  # the network's device; CPU for networks without parameters (ONNX Runtime sessions)
            device = next((p.device for p in network.parameters()), torch.device("cpu"))
        self.device = torch.device(device)
        self.network.to(self.device).eval()
        self.amp = amp and self.device.type == "cuda"
        self.image_size = int(network.image_size)
        self.transpose = transpose_slices
        self.stats = {"encoded": 0, "decoded": 0, "encode_s": 0.0, "decode_s": 0.0}

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module | None = None, *args, **kwargs) -> torch.Tensor:
        """MONAI ``Inferer`` interface for 2D batches already in the network frame: ``network(inputs, **prompts)``
        (with no prompt, a whole-image box), under mixed precision on CUDA. Used by MONAI tools and MONAI Label."""
        network = network if network is not None else self.network
        with self._autocast():
            return network(inputs.to(self.device), *args, **kwargs).float()

    # ------------------------------------------------------------------------------------------------------- low level
    def _autocast(self):
        if not self.amp:
            return nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _prepare(self, slices: np.ndarray, frame: SliceFrame) -> torch.Tensor:
        """``[N, A, B]`` or ``[N, 3, A, B]`` intensities in [0, 255] -> the network's input ``[N, 3, S, S]``."""
        image = torch.as_tensor(np.ascontiguousarray(slices), dtype=torch.float32)
        if image.ndim == 3:
            image = image[:, None]
        return self.network.preprocess(frame.to_image(image)).to(self.device)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Encode ``[N, 3, S, S]`` in batches of ``self.batch_size``, halving it on out-of-memory."""
        out: list[dict[str, torch.Tensor]] = []
        start = 0
        while start < images.shape[0]:
            chunk = images[start : start + self.batch_size]
            try:
                t0 = time.perf_counter()
                with self._autocast():
                    features = self.network.encode(chunk)
                self.stats["encode_s"] += time.perf_counter() - t0
            except RuntimeError as error:
                if not _is_oom(error) or self.batch_size == 1:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)
                logger.warning(
                    "out of memory encoding %d slices; retrying with batch size %d", chunk.shape[0], self.batch_size
                )
                continue
            self.stats["encoded"] += chunk.shape[0]
            out.extend({name: t[n] for name, t in features.items()} for n in range(chunk.shape[0]))
            start += chunk.shape[0]
        return out

    def features_for(
        self, volume: np.ndarray, indices: list[int], image_id, axis: int, frame: SliceFrame
    ) -> list[dict]:
        """Features of slices ``indices`` of ``volume [A, B, K]`` (or ``[3, A, B, K]``), from the cache or encoded."""
        found = {k: self.cache.get((image_id, axis, k)) for k in indices}
        missing = [k for k in indices if found[k] is None]
        if missing:
            slices = np.stack([volume[..., k] for k in missing])
            check_intensity_range(slices, f"slices {missing[0]}..{missing[-1]} of {image_id}")
            encoded = self._encode(self._prepare(slices, frame))
            for k, features in zip(missing, encoded):
                self.cache.put((image_id, axis, k), features)
                found[k] = features
        return [found[k] for k in indices]

    @torch.no_grad()
    def decode(
        self, features: list[dict], prompts: list[SlicePrompt], frame: SliceFrame, mask_inputs=None
    ) -> torch.Tensor:
        """Decode one prompt per slice (all slices in one batch); returns slice-grid logits ``[N, A, B]``."""
        boxes = [p.box for p in prompts]
        use_boxes = any(b is not None for b in boxes)
        if use_boxes and not all(b is not None for b in boxes):
            # mixed batch: decode in two groups to keep prompt tensors rectangular
            with_box = [n for n, b in enumerate(boxes) if b is not None]
            without = [n for n, b in enumerate(boxes) if b is None]
            out = [None] * len(prompts)
            for group in (with_box, without):
                logits = self.decode([features[n] for n in group], [prompts[n] for n in group], frame)
                for n, row in zip(group, logits):
                    out[n] = row
            return torch.stack(out)
        kwargs = {}
        if use_boxes:
            kwargs["boxes"] = torch.tensor(np.stack([frame.box_to_network(b) for b in boxes]), dtype=torch.float32)
        n_points = max(len(p.points) for p in prompts)
        if n_points:
            pts = np.zeros((len(prompts), n_points, 2), dtype=np.float32)
            labels = -np.ones((len(prompts), n_points), dtype=np.int64)
            for n, p in enumerate(prompts):
                if p.points:
                    pts[n, : len(p.points)] = frame.coords_to_network(np.array(p.points))
                    labels[n, : len(p.points)] = p.labels
            kwargs["points"], kwargs["point_labels"] = torch.from_numpy(pts), torch.from_numpy(labels)
        if mask_inputs is not None:
            kwargs["mask_inputs"] = mask_inputs
        batch = {name: torch.stack([f[name] for f in features]).to(self.device) for name in features[0]}
        t0 = time.perf_counter()
        with self._autocast():
            low_res = self.network.decode_low_res(batch, **kwargs)
            logits = self.network.upsample_logits(low_res.float())
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["decoded"] += len(prompts)
        return frame.logits_to_slice(logits)

    def box_from_mask(self, mask: np.ndarray, frame: SliceFrame) -> tuple[int, int, int, int] | None:
        """Bounding box of a slice mask ``[A, B]`` grown by ``margin`` network pixels, clipped to the slice."""
        if mask.sum() < self.min_area:
            return None
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        grow = int(math.ceil(self.margin / frame.scale))
        a0, a1 = max(0, rows[0] - grow), min(frame.shape[0] - 1, rows[-1] + grow)
        b0, b1 = max(0, cols[0] - grow), min(frame.shape[1] - 1, cols[-1] + grow)
        return (int(a0), int(b0), int(a1), int(b1))

    def contrast(self, image: np.ndarray, mask: np.ndarray, frame: SliceFrame) -> float:
        """|mean intensity inside ``mask`` - mean in a ring of ``margin`` network pixels around it| of a slice
        ``image`` (``[A, B]`` or ``[3, A, B]``, [0, 255]); ``inf`` when there is no ring (the mask fills the slice)."""
        from scipy import ndimage

        if not mask.any():
            return 0.0
        grey = image.mean(axis=0) if image.ndim == 3 else image
        width = max(2, int(math.ceil(self.margin / frame.scale)))
        ring = ndimage.binary_dilation(mask, iterations=width) & ~mask
        if not ring.any():
            return float("inf")
        return float(abs(grey[mask].mean() - grey[ring].mean()))

    # ------------------------------------------------------------------------------------------------------ high level
    def segment_slice(
        self, volume: np.ndarray, index: int, prompt: SlicePrompt, image_id="volume", axis: int = -1
    ) -> np.ndarray:
        """Segment one slice of ``volume [A, B, K]`` with ``prompt`` (reusing a cached embedding); ``[A, B]`` bool.

        This is the interactive path: a new click on an already-encoded slice only runs the decoder.
        """
        frame = SliceFrame(volume.shape[-3:-1], self.image_size, self.transpose)
        features = self.features_for(volume, [index], image_id, axis, frame)
        return (self.decode(features, [prompt], frame)[0] > 0).cpu().numpy()

    def segment_volume(
        self, volume: np.ndarray, plan: PromptPlan, image_id="volume"
    ) -> tuple[np.ndarray, list[SliceResult]]:
        """Segment ``volume`` (``[A, B, K]`` or ``[3, A, B, K]``, slices along the last axis) following ``plan``.

        Returns the boolean mask ``[A, B, K]`` and one :class:`SliceResult` per prompted slice, in slice order.
        Seeds (explicit prompts) are decoded first; with ``plan.propagate`` the mask is then carried slice by slice
        from the seeds outwards, each slice prompted with the box of its neighbour's mask plus ``margin``, until the
        mask vanishes or the volume ends. Slices are encoded ``batch_size`` at a time ahead of the propagation front.
        """
        num = volume.shape[-1]
        frame = SliceFrame(volume.shape[-3:-1], self.image_size, self.transpose)
        mask = np.zeros(volume.shape[-3:], dtype=bool)
        results: dict[int, SliceResult] = {}
        seeds = plan.seeds
        # 1. explicit prompts, batched
        keys = list(seeds)
        step = self.batch_size  # fixed here: _encode may lower self.batch_size on out-of-memory
        for start in range(0, len(keys), step):
            chunk = keys[start : start + step]
            features = self.features_for(volume, chunk, image_id, plan.axis, frame)
            logits = self.decode(features, [seeds[k] for k in chunk], frame)
            for k, row_logits in zip(chunk, logits):
                row = (row_logits > 0).cpu().numpy()
                mask[..., k] = row
                s = seeds[k]
                results[k] = SliceResult(
                    k, s.box, list(s.points), list(s.labels), int(row.sum()), score=_score(row_logits, row)
                )
        # 2. propagation outwards from the seeds (also through gaps between seeds)
        if plan.propagate:
            lo, hi = plan.seed_range
            for direction, begin, end in ((1, lo, num), (-1, hi, -1)):
                self._propagate(volume, mask, results, seeds, frame, image_id, plan.axis, begin, end, direction)
        return mask, [results[k] for k in sorted(results)]

    def _propagate(self, volume, mask, results, seeds, frame, image_id, axis, begin, end, direction) -> None:
        k = begin
        box = self.box_from_mask(mask[..., k], frame)
        k += direction
        while k != end:
            if k in results:  # a seed (or already done): restart the front from it
                box = self.box_from_mask(mask[..., k], frame)
                k += direction
                continue
            if box is None:
                # the mask vanished: jump to the next seed in this direction, if any
                ahead = [s for s in seeds if (s - k) * direction > 0]
                if not ahead:
                    return
                k = min(ahead, key=lambda s: abs(s - k))
                continue
            # encode a batch of slices ahead of the front (stopping before the next seed)
            ahead = []
            j = k
            while j != end and len(ahead) < self.batch_size and j not in results:
                ahead.append(j)
                j += direction
            batch = dict(zip(ahead, self.features_for(volume, ahead, image_id, axis, frame)))
            for j in ahead:
                if box is None:
                    break
                logits = self.decode([batch[j]], [SlicePrompt(box=box)], frame)[0]
                row = (logits > 0).cpu().numpy()
                result = SliceResult(j, box, area=int(row.sum()), propagated=True, score=_score(logits, row))
                result.contrast = self.contrast(volume[..., j], row, frame)
                if result.area < self.min_area:
                    result.stopped = "vanished"
                elif result.contrast < self.min_contrast:
                    result.stopped = "no contrast"
                    row = np.zeros_like(row)
                mask[..., j] = row
                results[j] = result
                box = None if result.stopped else self.box_from_mask(row, frame)
                k = j + direction
