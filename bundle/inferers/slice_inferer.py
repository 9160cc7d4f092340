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
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch

from bundle.networks.interface import PromptableNetwork

from .box_scan import MIN_CONSISTENCY, centred_boxes, consistency, pick_box, tight_box
from .cache import EmbeddingCache
from .corrections import drop_rejected_components, grow_box, merge_click
from .session import Click, InteractionSession, SliceState
from .volume_prompts import PromptPlan, SlicePrompt
from .windows import BoxWindowInferer

logger = logging.getLogger(__name__)

#: magnitude of the low-res logits a given mask becomes (the decoder's own logits are of this order inside objects)
MASK_INPUT_LOGIT = 10.0


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
    network ``x``), as ``bundle.data.volumes.take_slice`` makes training slices. With ``transpose`` rows = b and
    columns = a: a 2D image ``[x, y]`` (as ``LoadImage`` reads it) upright, or the radiological display of an
    ITK-loaded axial slice.
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

    def box_to_image(self, box) -> np.ndarray:
        """Inclusive voxel box (a0, b0, a1, b1) -> XYXY on the slice's image grid ``[H, W]`` (no frame scaling)."""
        box = np.asarray(box, dtype=np.float64)
        return np.concatenate([self._xy(box[:2]), self._xy(box[2:])])

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

    def mask_to_low_res(self, mask: np.ndarray, low_res_size: int) -> torch.Tensor:
        """A slice mask ``[A, B]`` -> low-res logits ``[1, m, m]`` for the decoder's ``mask_inputs``.

        The mask goes to the network frame as an image does (longest side, zero padding), is averaged down to
        ``m x m`` and mapped to ``MASK_INPUT_LOGIT * (2 * fraction - 1)``: +L inside, -L outside and in the padding.
        """
        image = self.to_image(torch.as_tensor(np.asarray(mask, dtype=np.float32))[None])
        framed = torch.as_tensor(self._to(image, mode="area"))[None]  # [1, 1, S, S]
        fraction = torch.nn.functional.adaptive_avg_pool2d(framed, low_res_size)[0]
        return MASK_INPUT_LOGIT * (2.0 * fraction.clamp(0, 1) - 1.0)


CLICK_MERGES = ("replace", "local")


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
        amp: mixed-precision autocast on the inferer's device: bf16 (fp16 on CUDA devices without bf16). ``None``
            (default): on CUDA only. ``True`` on CPU runs bf16 autocast there, slower than fp32 on CPUs without
            native bf16; it exists so that the mixed-precision code path can be checked without a GPU.
        device: where to run (default: the network's device).
        transpose_slices: show a volume slice ``[A, B]`` to the network as rows = b, columns = a (the radiological
            display of an ITK-loaded axial slice). Default ``False``: rows = a, as the data pipeline's
            ``bundle.data.volumes.take_slice`` makes the training slices, so inference sees what training saw.
        mask_inputs: feed a prompt's existing mask (a mask prompt's slice, or earlier low-res logits) to the decoder as
            ``mask_inputs`` beside its box. On by default: measured with LiteMedSAM (whose decoder was fine-tuned on
            boxes alone, its mask embedding left as SAM's) it raises the mean Dice of mask-prompted slices and of the
            propagation from them (docs/benchmarks.md). ``False``: the box alone.
        box_windows: ``None`` (default): every slice is resized into the network frame. A scale (``1.0``: the
            slice's own pixels): a box-only prompt on a slice larger than one window at that scale is segmented over
            the windows the box covers, the box clipped to each (:class:`~bundle.inferers.windows.BoxWindowInferer`).
            On the dermoscopy photos and ultrasound images measured (docs/benchmarks.md) the frame had the higher
            mean Dice on every dataset and was faster, so it stays off by default.
        click_merge: how a corrective click changes its slice (:mod:`bundle.inferers.corrections`): ``"local"``
            (default: clicks applied one at a time, each changing only the region connected to it, a background
            click removing at most half the slice's mask), or ``"replace"`` (the decoder's mask for the box and all
            clicks). Measured with LiteMedSAM on the interactive protocol, ``"replace"`` loses Dice with every click
            and ``"local"`` does not (docs/benchmarks.md).
        grow_box: a foreground click outside its slice's box grows the box to hold it (plus ``margin``).
        remove_components: a connected component (3D) holding a background click and no foreground click is removed.
        mask_feedback: with every click, feed the slice's previous low-res logits back to the decoder
            (``mask_inputs``); ``"auto"``: where the decoding network's weights were trained for it (their
            ``trained_prompts`` include ``"mask"``).
        box_scan: a slice prompted by clicks alone (no box, no mask) is decoded with square boxes of growing size
            centred on its first foreground click and keeps the most stable mask (:mod:`bundle.inferers.box_scan`);
            its other clicks then correct that mask as they would a box's. ``"auto"``: where the weights are known
            not to be trained on points (their ``trained_prompts`` lack ``"points"``, as LiteMedSAM's do).

    Input volumes are ``[A, B, K]`` (grey) or ``[3, A, B, K]`` (RGB) float arrays already intensity-normalised to
    [0, 255] for their modality (the data pipeline's ``ModalityNormalize``), with slices along the last axis; a
    volume outside that range (e.g. scaled to [0, 1]) is a ValueError.

    Clicks on a slice are applied in the order given. An :class:`~bundle.inferers.session.InteractionSession` per
    object passed to :meth:`segment_objects` keeps each slice's result, so a request that adds clicks to the previous
    one only applies the new ones; without one every request is replayed from its box, with the same result.
    """

    def __init__(
        self,
        network: PromptableNetwork,
        batch_size: int = 8,
        cache: EmbeddingCache | None = None,
        margin: float = 5.0,
        min_area: int = 1,
        min_contrast: float = 10.0,
        amp: bool | None = None,
        device: str | torch.device | None = None,
        transpose_slices: bool = False,
        mask_inputs: bool = True,
        box_windows: float | None = None,
        click_merge: str = "local",
        grow_box: bool = True,
        remove_components: bool = False,
        mask_feedback: bool | str = "auto",
        box_scan: bool | str = "auto",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if click_merge not in CLICK_MERGES:
            raise ValueError(f"click_merge must be one of {CLICK_MERGES}, got {click_merge!r}")
        if mask_feedback not in (True, False, "auto"):
            raise ValueError(f"mask_feedback must be true, false or 'auto', got {mask_feedback!r}")
        if box_scan not in (True, False, "auto"):
            raise ValueError(f"box_scan must be true, false or 'auto', got {box_scan!r}")
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
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        self.image_size = int(network.image_size)
        self.transpose = transpose_slices
        self.mask_inputs = bool(mask_inputs)
        self.click_merge = click_merge
        self.grow_box = bool(grow_box)
        self.remove_components = bool(remove_components)
        self.mask_feedback = mask_feedback
        self.box_scan = box_scan
        self.stats = {"encoded": 0, "decoded": 0, "encode_s": 0.0, "decode_s": 0.0}
        if box_windows is not None and not box_windows > 0:
            raise ValueError(
                f"box_windows must be a scale > 0 (1.0: the slice's own pixels) or None, got {box_windows}"
            )
        self.box_windows = box_windows
        self.windows = BoxWindowInferer(network, sw_batch_size=self.batch_size, device=self.device)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module | None = None, *args, **kwargs) -> torch.Tensor:
        """MONAI ``Inferer`` interface for 2D batches already in the network frame: ``network(inputs, **prompts)``
        (with no prompt, a whole-image box), under the inferer's mixed precision. Used by MONAI tools and MONAI Label."""
        network = network if network is not None else self.network
        with self._autocast():
            return network(inputs.to(self.device), *args, **kwargs).float()

    # ------------------------------------------------------------------------------------------------------- low level
    def _autocast(self):
        if not self.amp:
            return nullcontext()
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

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

    def mask_input(self, prompt: SlicePrompt, frame: SliceFrame) -> torch.Tensor | None:
        """The ``mask_inputs`` row ``[1, m, m]`` of a prompt (its ``mask_logits``, else its ``mask``), or ``None`` when
        it has neither or the ``mask_inputs`` switch is off."""
        if not self.mask_inputs:
            return None
        size = int(self.network.mask_input_size)
        if prompt.mask_logits is not None:
            logits = torch.as_tensor(prompt.mask_logits, dtype=torch.float32).reshape(1, size, size)
            return logits
        if prompt.mask is not None:
            return frame.mask_to_low_res(prompt.mask, size)
        return None

    def uses_feedback(self) -> bool:
        """Whether click decodes get the slice's previous low-res logits (``mask_feedback``)."""
        if self.mask_feedback == "auto":
            return "mask" in (getattr(self.network, "trained_prompts", None) or ())
        return bool(self.mask_feedback)

    def uses_box_scan(self) -> bool:
        """Whether a slice with clicks alone gets a box around its first foreground click (``box_scan``)."""
        if self.box_scan == "auto":
            trained = getattr(self.network, "trained_prompts", None)
            return trained is not None and "points" not in trained
        return bool(self.box_scan)

    @torch.no_grad()
    def decode(self, features: list[dict], prompts: list[SlicePrompt], frame: SliceFrame) -> torch.Tensor:
        """Decode one prompt per slice (rows of the same prompt kinds in one batch); slice-grid logits ``[N, A, B]``."""
        return self.decode_low_res(features, prompts, frame)[0]

    @torch.no_grad()
    def decode_low_res(
        self,
        features: list[dict],
        prompts: list[SlicePrompt],
        frame: SliceFrame,
        mask_inputs: list[torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one prompt per slice: slice-grid logits ``[N, A, B]`` and low-res logits ``[N, 1, m, m]``.

        ``mask_inputs`` holds a ``[1, m, m]`` row (or ``None``) per prompt; by default each prompt's own
        (:meth:`mask_input`). Rows of the same prompt kinds are decoded in one batch.
        """
        masks = [self.mask_input(p, frame) for p in prompts] if mask_inputs is None else list(mask_inputs)
        kinds = [(p.box is not None, m is not None) for p, m in zip(prompts, masks)]
        if len(set(kinds)) > 1:  # decode each kind of row on its own to keep the prompt tensors rectangular
            slice_logits: list = [None] * len(prompts)
            low_res: list = [None] * len(prompts)
            for kind in dict.fromkeys(kinds):
                group = [n for n, k in enumerate(kinds) if k == kind]
                part, low = self.decode_low_res(
                    [features[n] for n in group], [prompts[n] for n in group], frame, [masks[n] for n in group]
                )
                for n, row, low_row in zip(group, part, low):
                    slice_logits[n], low_res[n] = row, low_row
            return torch.stack(slice_logits), torch.stack(low_res)
        kwargs = {}
        if prompts[0].box is not None:
            boxes = np.stack([frame.box_to_network(p.box) for p in prompts])
            kwargs["boxes"] = torch.tensor(boxes, dtype=torch.float32)
        n_points = max(len(p.points) for p in prompts)
        if n_points:
            pts = np.zeros((len(prompts), n_points, 2), dtype=np.float32)
            labels = -np.ones((len(prompts), n_points), dtype=np.int64)
            for n, p in enumerate(prompts):
                if p.points:
                    pts[n, : len(p.points)] = frame.coords_to_network(np.array(p.points))
                    labels[n, : len(p.points)] = p.labels
            kwargs["points"], kwargs["point_labels"] = torch.from_numpy(pts), torch.from_numpy(labels)
        if masks[0] is not None:
            kwargs["mask_inputs"] = torch.stack([m.float() for m in masks]).to(self.device)
        batch = {name: torch.stack([f[name] for f in features]).to(self.device) for name in features[0]}
        t0 = time.perf_counter()
        with self._autocast():
            low_res = self.network.decode_low_res(batch, **kwargs).float()
            logits = self.network.upsample_logits(low_res)
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["decoded"] += len(prompts)
        return frame.logits_to_slice(logits), low_res

    def box_from_mask(self, mask: np.ndarray, frame: SliceFrame) -> tuple[int, int, int, int] | None:
        """Bounding box of a slice mask ``[A, B]`` grown by ``margin`` network pixels, clipped to the slice."""
        if mask.sum() < self.min_area:
            return None
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        grow = self._grow(frame)
        a0, a1 = max(0, rows[0] - grow), min(frame.shape[0] - 1, rows[-1] + grow)
        b0, b1 = max(0, cols[0] - grow), min(frame.shape[1] - 1, cols[-1] + grow)
        return (int(a0), int(b0), int(a1), int(b1))

    def _grow(self, frame: SliceFrame) -> int:
        """``margin`` (network pixels) in slice voxels."""
        return int(math.ceil(self.margin / frame.scale))

    def contrast(self, image: np.ndarray, mask: np.ndarray, frame: SliceFrame) -> float:
        """|mean intensity inside ``mask`` - mean in a ring of ``margin`` network pixels around it| of a slice
        ``image`` (``[A, B]`` or ``[3, A, B]``, [0, 255]); ``inf`` when there is no ring (the mask fills the slice)."""
        from scipy import ndimage

        if not mask.any():
            return 0.0
        grey = image.mean(axis=0) if image.ndim == 3 else image
        width = max(2, self._grow(frame))
        ring = ndimage.binary_dilation(mask, iterations=width) & ~mask
        if not ring.any():
            return float("inf")
        return float(abs(grey[mask].mean() - grey[ring].mean()))

    def _over_windows(self, prompt: SlicePrompt, frame: SliceFrame) -> bool:
        return (
            self.box_windows is not None
            and prompt.box is not None
            and not prompt.points
            and prompt.mask is None
            and prompt.mask_logits is None
            and max(frame.hw) * self.box_windows > self.image_size
        )

    def box_over_windows(self, volume: np.ndarray, index: int, box, frame: SliceFrame) -> torch.Tensor:
        """Slice-grid logits ``[A, B]`` of slice ``index`` for the voxel ``box`` over the windows it covers at scale
        ``box_windows`` (:class:`~bundle.inferers.windows.BoxWindowInferer`)."""
        image = np.asarray(volume[..., index], dtype=np.float32)
        check_intensity_range(image, f"slice {index}")
        image = frame.to_image(torch.from_numpy(image if image.ndim == 3 else image[None]))
        before = self.windows.windows_run
        with self._autocast():
            logits = self.windows(image, frame.box_to_image(box).tolist(), scale=self.box_windows)
        self.stats["encoded"] += self.windows.windows_run - before
        return frame.to_image(logits.float())

    # ------------------------------------------------------------------------------------------ clicks on slices
    def _job(self, prompt: SlicePrompt, frame: SliceFrame) -> SlicePrompt:
        """A slice's prompt as it is decoded: its box grown for foreground clicks outside it (``grow_box``)."""
        if not self.grow_box or prompt.box is None:
            return prompt
        return replace(prompt, box=grow_box(prompt.box, prompt.points, prompt.labels, self._grow(frame), frame.shape))

    def settle(
        self,
        jobs: dict[int, SlicePrompt],
        features: dict[int, dict],
        frame: SliceFrame,
        axis: int,
        session: InteractionSession,
    ) -> dict[int, tuple[SliceState, torch.Tensor]]:
        """Bring slices ``jobs`` (index -> prompt) to their masks, reusing ``session`` where it holds them.

        A slice whose session state has the same box and some of these clicks only applies the others (a prompt
        with a mask prompt always starts afresh); any other slice starts from its box (or, without one, from its
        clicks up to the first foreground click). Clicks are then applied one round at a time over all slices (one
        batched decode per round); with ``click_merge="replace"`` and no mask feedback only the last decode matters,
        so the whole prompt is decoded once. Returns per slice its new state and slice-grid logits ``[A, B]`` that
        agree with its mask; the states are put into ``session``.
        """
        requested = {k: prompt.box for k, prompt in jobs.items()}  # what a session's state is matched on
        jobs = dict(jobs)
        done: dict[int, SliceState] = {}
        todo: dict[int, list] = {}  # index -> [state so far (None: none yet), clicks still to apply]
        for k, prompt in jobs.items():
            clicks = _clicks(prompt)
            reusable = prompt.mask is None and prompt.mask_logits is None
            state = session.get(axis, k) if reusable else None
            if state is not None and state.shape == frame.shape and state.continues(prompt.box, clicks):
                if state.decode_box is not None:  # clicks alone, decoded with the box chosen for them
                    jobs[k] = self._job(replace(prompt, box=state.decode_box), frame)
                rest = state.new_clicks(clicks)
                if not rest:
                    done[k] = state
                    continue
                todo[k] = [state, rest]
            else:
                todo[k] = [None, list(clicks)]
        feedback = self.uses_feedback()
        sequential = self.click_merge == "local" or feedback
        if not sequential:  # one decode of the whole prompt
            for k, entry in todo.items():
                entry[0], entry[1] = None, []
        logits_of: dict[int, torch.Tensor] = {}

        fresh = [k for k, (state, _) in todo.items() if state is None]
        if self.uses_box_scan():  # a slice with clicks alone: a box chosen around its first foreground click
            for k in fresh:
                if jobs[k].box is None and jobs[k].mask is None and jobs[k].mask_logits is None:
                    state, row = self._scanned(jobs, k, features[k], frame, requested[k], sequential)
                    if state is not None:
                        todo[k][0] = state
                        todo[k][1].remove(state.clicks[0])
                        logits_of[k] = row
            fresh = [k for k in fresh if todo[k][0] is None]

        # the start of every other slice without a usable state: its box, or its clicks up to the first foreground one
        starts: dict[int, tuple[Click, ...]] = {}
        for k in fresh:
            clicks = _clicks(jobs[k])
            anchored = jobs[k].box is not None or jobs[k].mask is not None or jobs[k].mask_logits is not None
            first = len(clicks) if not sequential else 0 if anchored else _first_foreground(clicks) + 1
            starts[k] = clicks[:first]
            todo[k][1] = list(clicks[first:])
        for begin in range(0, len(fresh), self.batch_size):
            chunk = fresh[begin : begin + self.batch_size]
            prompts = [_with_clicks(jobs[k], starts[k]) for k in chunk]
            logits, low = self.decode_low_res([features[k] for k in chunk], prompts, frame)
            for k, row, low_row in zip(chunk, logits, low):
                mask = (row > 0).cpu().numpy()
                todo[k][0] = SliceState.create(
                    requested[k], starts[k], mask, low_row, _score(row, mask), decode_box=jobs[k].box
                )
                logits_of[k] = row

        # corrective clicks, one round at a time
        while pending := [k for k, (_, rest) in todo.items() if rest]:
            for begin in range(0, len(pending), self.batch_size):
                chunk = pending[begin : begin + self.batch_size]
                prompts, masks, clicks_after = [], [], {}
                for k in chunk:
                    state, rest = todo[k]
                    clicks_after[k] = state.clicks + (rest.pop(0),)
                    prompts.append(_with_clicks(jobs[k], clicks_after[k]))
                    own = self.mask_input(jobs[k], frame)
                    masks.append(state.low_res.float() if feedback and state.low_res is not None else own)
                logits, low = self.decode_low_res([features[k] for k in chunk], prompts, frame, masks)
                for k, row, low_row in zip(chunk, logits, low):
                    candidate = (row > 0).cpu().numpy()
                    clicks = clicks_after[k]
                    mask = candidate
                    if self.click_merge == "local":
                        a, b, label = clicks[-1]
                        foreground = [(ca, cb) for ca, cb, cl in clicks if cl == 1]
                        mask = merge_click(todo[k][0].mask, candidate, (a, b), label, foreground)
                    todo[k][0] = SliceState.create(
                        requested[k], clicks, mask, low_row, _score(row, mask), decode_box=jobs[k].box
                    )
                    logits_of[k] = _agreeing(row, mask)
        for k, (state, _) in todo.items():
            session.put(axis, k, state)
            done[k] = state
        out = {}
        for k, state in done.items():
            if k not in logits_of:  # a state kept from an earlier request: its logits from its low-res ones
                low = state.low_res[None].float().to(self.device)
                logits_of[k] = _agreeing(frame.logits_to_slice(self.network.upsample_logits(low))[0], state.mask)
            out[k] = (state, logits_of[k])
        return out

    def _scan(self, features, frame, point):
        """The boxes centred on ``point``, their slice-grid and low-res logits, the chosen one's index and its
        mask ``[A, B]`` (:mod:`bundle.inferers.box_scan`: one batched decode of the boxes, then of the tight boxes
        of their most stable masks, a few at a time, until one comes back)."""
        boxes = centred_boxes(point, frame.scale, frame.shape, self.image_size)
        logits, low = self.decode_low_res([features] * len(boxes), [SlicePrompt(box=box) for box in boxes], frame)

        def comes_back(masks: list[np.ndarray]) -> list[bool]:
            tight = [SlicePrompt(box=tight_box(mask, frame.shape)) for mask in masks]
            again, _ = self.decode_low_res([features] * len(tight), tight, frame)
            return [consistency(m, (row > 0).cpu().numpy()) >= MIN_CONSISTENCY for m, row in zip(masks, again)]

        best, mask = pick_box(logits, point, comes_back)
        return boxes, logits, low, best, mask

    def _scanned(self, jobs, k, features, frame, requested_box, sequential):
        """Choose the box of click-only slice ``k`` (``jobs[k]`` gets it); with ``sequential`` click handling also
        return its state after the first foreground click (the chosen box's mask) and its logits ``[A, B]``."""
        clicks = _clicks(jobs[k])
        first = clicks[_first_foreground(clicks)]
        point = first[:2]
        boxes, logits, low, best, mask = self._scan(features, frame, point)
        if not mask.any():  # no box holds the click: it stays a point prompt
            return None, None
        jobs[k] = self._job(replace(jobs[k], box=boxes[best]), frame)  # grown for foreground clicks outside it
        if not sequential:
            return None, None
        row = _agreeing(logits[best], mask)
        state = SliceState.create(requested_box, (first,), mask, low[best], _score(row, mask), boxes[best])
        return state, row

    # ------------------------------------------------------------------------------------------------------ high level
    def segment_slice(
        self,
        volume: np.ndarray,
        index: int,
        prompt: SlicePrompt,
        image_id="volume",
        axis: int = -1,
        session: InteractionSession | None = None,
        *,
        transpose: bool | None = None,
    ) -> np.ndarray:
        """Segment one slice of ``volume [A, B, K]`` with ``prompt`` (reusing a cached embedding); ``[A, B]`` bool.

        This is the interactive path: a new click on an already-encoded slice only runs the decoder (and, with a
        ``session`` that holds the slice's previous result, only for the new click). ``transpose`` overrides
        ``transpose_slices`` for this call (``True`` for a 2D image ``[x, y]``, shown upright).
        """
        frame = SliceFrame(volume.shape[-3:-1], self.image_size, self.transpose if transpose is None else transpose)
        session = session if session is not None else InteractionSession()
        job = self._job(prompt, frame)
        features = dict(zip([index], self.features_for(volume, [index], image_id, axis, frame)))
        mask = self.settle({index: job}, features, frame, axis, session)[index][0].mask
        if self.remove_components:
            mask = drop_rejected_components(mask, list(zip(job.points, job.labels)))
        return mask

    def segment_volume(
        self,
        volume: np.ndarray,
        plan: PromptPlan,
        image_id="volume",
        session: InteractionSession | None = None,
        on_slice: Callable[[int], None] | None = None,
        *,
        transpose: bool | None = None,
    ) -> tuple[np.ndarray, list[SliceResult]]:
        """Segment one object of ``volume`` (``[A, B, K]`` or ``[3, A, B, K]``, slices along the last axis) following
        ``plan``; returns the boolean mask ``[A, B, K]`` and one :class:`SliceResult` per decoded slice, in slice order.
        See :meth:`segment_objects`."""
        labels, (results,) = self.segment_objects(
            volume, [plan], image_id=image_id, transpose=transpose, sessions=[session], on_slice=on_slice
        )
        return labels > 0, results

    def segment_objects(
        self,
        volume: np.ndarray,
        plans: list[PromptPlan],
        image_id="volume",
        labels: list[int] | None = None,
        sessions: list[InteractionSession | None] | None = None,
        on_slice: Callable[[int], None] | None = None,
        *,
        transpose: bool | None = None,
    ) -> tuple[np.ndarray, list[list[SliceResult]]]:
        """Segment several objects of ``volume`` (``[A, B, K]`` or ``[3, A, B, K]``) into one label map.

        Object ``n`` follows ``plans[n]`` and is written with ``labels[n]`` (default ``n + 1``); where objects overlap,
        the voxel goes to the object with the higher probability (logit), ties to the earlier object. Each object is
        segmented as it would be alone: its seeds (explicit prompts) are decoded; with ``plan.propagate`` its mask is
        carried slice by slice from the seeds outwards, each slice prompted with the box of the object's own mask on
        its neighbour plus ``margin``, until the mask vanishes or the volume ends. All objects move through the
        volume together, in one pass upwards (seeds and upward propagation) and one downwards, so a slice is encoded
        once per pass for all of them (``batch_size`` slices per encoder call, ahead of the fronts) and a slice both
        passes need is taken from the embedding cache. Each object's rows are decoded in batches of their own, so an
        object's mask does not depend on the others. Clicks on a slice are applied in order (see :meth:`settle`); a
        slice with background clicks only corrects what propagation brings to it. ``sessions`` (one per object, or
        ``None``) keep each object's slice results for its next request. ``transpose`` overrides ``transpose_slices``
        for this call (``True`` for a 2D image ``[x, y]``, shown upright). Returns the label map ``[A, B, K]`` (uint8,
        or uint16 for labels over 255) and, per object, one :class:`SliceResult` per decoded slice in slice order.
        ``on_slice(k)`` is called after each object's slice ``k`` is decoded (e.g. a progress bar's update).
        """
        plans = list(plans)
        labels = list(range(1, len(plans) + 1)) if labels is None else [int(v) for v in labels]
        if not plans or len(labels) != len(plans):
            raise ValueError(f"expected one label per plan, got {len(plans)} plans and labels {labels}")
        if any(not 1 <= v <= 65535 for v in labels):
            raise ValueError(f"labels must lie in [1, 65535], got {labels}")
        num = volume.shape[-1]
        if any(p.axis != plans[0].axis or p.num_slices != num for p in plans):
            raise ValueError(f"every plan must take the {num} slices of the volume along one axis")
        frame = SliceFrame(volume.shape[-3:-1], self.image_size, self.transpose if transpose is None else transpose)
        sessions = list(sessions) if sessions is not None else [None] * len(plans)
        if len(sessions) != len(plans):
            raise ValueError(f"expected one session per plan, got {len(sessions)} for {len(plans)} plans")
        tracks = [
            _Track(plan, label, index, session if session is not None else InteractionSession())
            for index, (plan, label, session) in enumerate(zip(plans, labels, sessions))
        ]
        canvas = _LabelCanvas(volume.shape[-3:], max(labels), several=len(tracks) > 1, on_paint=on_slice)
        sweep = partial(self._sweep, volume, canvas=canvas, frame=frame, image_id=image_id, axis=plans[0].axis)
        sweep(tracks, direction=1, with_seeds=True)  # the seeds, and propagation upwards from the lowest ones
        propagating = [t for t in tracks if t.plan.propagate]
        if propagating:
            restarted = {t.index: len(t.restarted) for t in propagating}
            sweep(propagating, direction=-1, with_seeds=False)  # propagation downwards from the highest seeds
            # an object restarted on the way down: upwards again from there, into the slices below where it vanished
            again = [t for t in propagating if len(t.restarted) > restarted[t.index]]
            if again:
                sweep(again, direction=1, with_seeds=False)
        if self.remove_components:
            for track in tracks:
                self._remove_rejected(track, canvas)
        return canvas.labels, [[t.results[k] for k in sorted(t.results)] for t in tracks]

    def _commit(self, track, result: SliceResult, logits: torch.Tensor, row: np.ndarray, canvas, frame) -> None:
        track.results[result.index] = result
        track.boxes[result.index] = self.box_from_mask(row, frame)
        canvas.paint(result.index, row, logits, track)

    def _decode_seeds(self, track, slices: list[int], features: dict, canvas, frame, axis: int) -> None:
        """Decode one object's explicit prompts on ``slices`` (batched, seeds or restarts), its clicks applied in
        order."""
        jobs = {k: self._job(track.seeds.get(k) or track.corrections[k], frame) for k in slices}
        for k, (state, logits) in sorted(self.settle(jobs, features, frame, axis, track.session).items()):
            job, row = jobs[k], state.mask
            result = SliceResult(k, job.box, list(job.points), list(job.labels), int(row.sum()), score=state.score)
            self._commit(track, result, logits, row, canvas, frame)

    def _decode_windowed(self, volume, track, slices: list[int], canvas, frame) -> None:
        """Decode one object's box-only prompts on ``slices`` over the windows each box covers (``box_windows``)."""
        for k in slices:
            box = track.seeds[k].box
            logits = self.box_over_windows(volume, k, box, frame)
            row = (logits > 0).numpy()
            self._commit(
                track, SliceResult(k, box, area=int(row.sum()), score=_score(logits, row)), logits, row, canvas, frame
            )

    def _propagate_to(self, volume, track, k: int, box, features: dict, canvas, frame, axis: int) -> tuple | None:
        """Decode slice ``k`` of one object with the box from its neighbour (and the slice's background clicks, a
        correction of what propagation brings there); returns the box for the next slice."""
        correction = track.corrections.get(k)
        prompt = SlicePrompt(box=box)
        if correction is not None:
            prompt = SlicePrompt(box=box, points=list(correction.points), labels=list(correction.labels))
        state, logits = self.settle({k: prompt}, {k: features}, frame, axis, track.session)[k]
        row = state.mask
        result = SliceResult(
            k, box, list(prompt.points), list(prompt.labels), int(row.sum()), propagated=True, score=state.score
        )
        result.contrast = self.contrast(volume[..., k], row, frame)
        if result.area < self.min_area:
            result.stopped = "vanished"
        elif result.contrast < self.min_contrast and correction is None:
            result.stopped = "no contrast"
            row = np.zeros_like(row)
        self._commit(track, result, logits, row, canvas, frame)
        return None if result.stopped else track.boxes[k]

    def _remove_rejected(self, track, canvas) -> None:
        """Clear the connected components (3D) of one object's mask that hold its background clicks and none of its
        foreground clicks (``remove_components``)."""
        clicks = [
            ((a, b, k), label)
            for k, prompt in track.plan.seeds.items()
            for (a, b), label in zip(prompt.points, prompt.labels)
        ]
        if not any(label == 0 for _, label in clicks):
            return
        mine = canvas.labels == track.label
        kept = drop_rejected_components(mine, clicks)
        canvas.labels[mine & ~kept] = 0
        for k, result in track.results.items():
            result.area = int(kept[..., k].sum())

    def _sweep(self, volume, tracks, canvas, frame, image_id, axis, direction: int, with_seeds: bool) -> None:
        """One pass through the slices in ``direction`` for all ``tracks`` together.

        With ``with_seeds`` the objects' explicit prompts are decoded as the pass reaches them. A propagating object's
        front starts at its first seed in this direction (its lowest going up, its highest going down); a slice the
        object already has restarts the front from it, a vanished front jumps to the object's next seed. Slices are
        encoded ``batch_size`` at a time ahead of the fronts, once for every object that needs them.
        """
        num = volume.shape[-1]
        step = self.batch_size  # fixed here: _encode may lower self.batch_size on out-of-memory
        pending = {t.index: set(t.seeds) if with_seeds else set() for t in tracks}
        begins = {t.index: (min if direction > 0 else max)([*t.seeds, *t.restarted]) for t in tracks}
        fronts: dict[int, tuple | None] = {}  # object index -> the box for its next slice (None: vanished)
        done = {t.index for t in tracks if not t.plan.propagate}
        window: dict[int, dict] = {}  # encoded slices ahead of the fronts
        for t in tracks if with_seeds else []:  # seeds decoded over windows (box_windows) need no frame encoding
            windowed = sorted(k for k in pending[t.index] if self._over_windows(t.seeds[k], frame))
            self._decode_windowed(volume, t, windowed, canvas, frame)
            pending[t.index].difference_update(windowed)

        def started(t, j) -> bool:
            return t.index not in done and (j - begins[t.index]) * direction > 0

        def needed(j) -> bool:
            return any(j in pending[t.index] or (started(t, j) and j not in t.results) for t in tracks)

        def fill_window(k) -> dict:
            ahead, j = [], k
            while 0 <= j < num and len(ahead) < step:
                if needed(j):
                    ahead.append(j)
                j += direction
            features = dict(zip(ahead, self.features_for(volume, ahead, image_id, axis, frame)))
            for t in tracks:  # the explicit prompts on these slices, each object's rows in one batch
                mine = [j for j in ahead if j in pending[t.index]]
                if mine:
                    self._decode_seeds(t, mine, features, canvas, frame, axis)
                    pending[t.index].difference_update(mine)
            return features

        # the pass starts on the first seed (with_seeds) or on the slice after it
        first = (min if direction > 0 else max)(begins.values()) + (0 if with_seeds else direction)
        for k in range(first, num if direction > 0 else -1, direction):
            if any(k in p for p in pending.values()) and k not in window:
                window = fill_window(k)
            todo, restart = [], []
            for t in tracks:
                if not started(t, k):
                    continue
                if k - direction == begins[t.index]:
                    fronts[t.index] = t.boxes[begins[t.index]]
                if k in t.results:  # a seed (or done in the other direction): restart the front from it
                    fronts[t.index] = t.boxes[k]
                elif fronts[t.index] is not None:
                    todo.append(t)
                elif k in t.restarts:  # vanished before a foreground correction: it starts the object again
                    restart.append(t)
                elif not any((s - k) * direction > 0 for s in [*t.seeds, *t.restarts]):
                    done.add(t.index)  # vanished, and no seed ahead to restart from
            if todo or restart:
                if k not in window:
                    window = fill_window(k)
                for t in todo:
                    fronts[t.index] = self._propagate_to(volume, t, k, fronts[t.index], window[k], canvas, frame, axis)
                for t in restart:
                    self._decode_seeds(t, [k], window, canvas, frame, axis)
                    t.restarted.append(k)
                    fronts[t.index] = t.boxes[k]
            elif len(done) == len(tracks) and not any(pending.values()):
                return


@dataclass
class _Track:
    """One object's progress through a volume: its plan, label, decoded slices and the box of its mask on each."""

    plan: PromptPlan
    label: int
    index: int
    session: InteractionSession = field(default_factory=InteractionSession)
    results: dict[int, SliceResult] = field(default_factory=dict)
    boxes: dict[int, tuple | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a slice with clicks only (no box, no mask) corrects what propagation brings to it when its clicks are all
        # background ones, or when the object starts elsewhere: on a slice with a box or a mask, or on the first
        # foreground click's slice (the plan's anchor); a foreground click among these restarts a front that
        # vanished before it
        anchor = self.plan.anchor
        framed = any(s.box is not None or s.mask is not None for s in self.plan.seeds.values())

        def corrects(k: int, seed: SlicePrompt) -> bool:
            if seed.box is not None or seed.mask is not None:
                return False
            return 1 not in seed.labels or framed or anchor is not None and k != anchor

        self.corrections = {k: s for k, s in self.plan.seeds.items() if corrects(k, s)}
        self.restarts = [k for k, s in self.corrections.items() if 1 in s.labels]
        self.restarted: list[int] = []  # the restarts decoded so far
        self.seeds = {k: s for k, s in self.plan.seeds.items() if k not in self.corrections}
        if not self.seeds:
            raise ValueError(
                "no slice has a box, a mask or a foreground click; background clicks alone segment nothing"
            )


class _LabelCanvas:
    """The label map being painted: each object's slice masks, the higher logit winning where objects overlap."""

    def __init__(
        self, shape: tuple[int, ...], max_label: int, several: bool, on_paint: Callable[[int], None] | None = None
    ) -> None:
        # column-major: each slice [..., k] is contiguous, and the [Z, Y, X] view ITK writes is a C array (no copy)
        self.labels = np.zeros(shape, dtype=np.uint8 if max_label <= 255 else np.uint16, order="F")
        self.several = several
        self.on_paint = on_paint  # called with each decoded slice's index
        self.best: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # slice -> (winning logit, winning object index)

    def paint(self, k: int, row: np.ndarray, logits: torch.Tensor, track: _Track) -> None:
        if self.on_paint is not None:
            self.on_paint(k)
        if not row.any():
            return
        target = self.labels[..., k]
        if not self.several:
            target[row] = track.label
            return
        if k not in self.best:
            self.best[k] = (np.full(row.shape, -np.inf, np.float32), np.full(row.shape, -1, np.int32))
        best, owner = self.best[k]
        values = logits.float().cpu().numpy()
        win = row & ((values > best) | ((values == best) & (owner > track.index)))
        best[win], owner[win] = values[win], track.index
        target[win] = track.label


def _clicks(prompt: SlicePrompt) -> tuple[Click, ...]:
    return tuple((int(a), int(b), int(label)) for (a, b), label in zip(prompt.points, prompt.labels))


def _first_foreground(clicks: tuple[Click, ...]) -> int:
    return next(i for i, (_, _, label) in enumerate(clicks) if label == 1)


def _with_clicks(prompt: SlicePrompt, clicks: tuple[Click, ...]) -> SlicePrompt:
    """``prompt`` (box, mask) with only ``clicks``."""
    return replace(prompt, points=[(a, b) for a, b, _ in clicks], labels=[label for *_, label in clicks])


def _agreeing(logits: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """``logits`` made to agree in sign with ``mask`` where a click rule changed the decoder's mask (the label canvas
    compares objects' logits)."""
    inside = torch.from_numpy(np.asarray(mask, dtype=bool)).to(logits.device)
    return torch.where(inside, logits.clamp(min=1e-3), logits.clamp(max=-1e-3))
