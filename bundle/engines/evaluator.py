"""SupervisedEvaluator subclass: every mask is segmented under every prompt mode, Dice and NSD recorded per mask."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.metrics import compute_dice, compute_surface_dice
from monai.utils.enums import CommonKeys as Keys

from bundle.networks.interface import PromptableNetwork, unwrap
from bundle.transforms import frame_shape

from .interactive import InteractiveDecoding
from .prompts import initial_prompts
from .trainer import flatten_masks

__all__ = ["SAMUNetEvaluator", "PromptModeMetric", "parse_mode", "DEFAULT_MODES"]

#: SAM-Med2D's protocol: box, 1 / 3 / 5 points, and k-step interactive correction started from one point.
DEFAULT_MODES = ("box", "points:1", "points:3", "points:5", "interactive:5")


def parse_mode(mode: str) -> tuple[str, int]:
    """``"box"`` -> (box, 0); ``"points:3"`` -> (points, 3); ``"interactive:5"`` -> (interactive, 5 corrective steps)."""
    kind, _, count = str(mode).partition(":")
    if kind == "box" and not count:
        return kind, 0
    if kind in ("points", "interactive") and count.isdigit() and int(count) >= 1:
        return kind, int(count)
    raise ValueError(f"prompt mode {mode!r}: expected 'box', 'points:<n>' or 'interactive:<k>' (n, k >= 1)")


def _as_list(value, n: int, default) -> list:
    """A collated per-item batch field (list, tuple or tensor) as a python list of ``n`` items."""
    if value is None:
        return [default] * n
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    value = list(value)
    if len(value) != n:
        raise ValueError(f"expected {n} per-image values, got {len(value)}: {value!r}")
    return value


def _pairs(value, n: int) -> list | None:
    """Collated per-item pairs (``[B, 2]`` tensor, list of pairs, or a pair of ``[B]`` tensors) as ``n`` lists of 2."""
    if value is None:
        return None
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and isinstance(value[0], torch.Tensor)
        and value[0].ndim == 1
    ):
        value = torch.stack(list(value), dim=1)
    arr = torch.as_tensor(value if not isinstance(value, (list, tuple)) else [list(map(float, v)) for v in value])
    return arr.reshape(n, -1)[:, -2:].tolist()


class SAMUNetEvaluator(SupervisedEvaluator):
    """Evaluates SAMUNet per mask and per prompt mode (SAM-Med2D / MedSAM protocol).

    Each image of a batch is encoded once; each of its masks (``label`` ``[B, M, S, S]``) is then decoded once per
    mode in ``prompt_modes``: ``"box"`` (tight box of the largest component, no jitter), ``"points:n"`` (n points,
    SAM-Med2D's foreground/background mix) and ``"interactive:k"`` (``interactive_start`` then k corrective clicks with
    the previous low-res mask fed back). Dice and normalised surface Dice (NSD, ``nsd_tolerance_mm`` in mm, from the
    per-image ``spacing`` in mm of the original grid, scaled to the network frame) are computed with MONAI's
    ``compute_dice`` / ``compute_surface_dice`` on the unpadded part of the frame.

    Empty ground-truth masks are not skipped silently: they are not prompted (no box or click exists) but get a row
    with ``status="empty_mask"`` and are counted per modality in the summaries.

    ``engine.state.output`` holds ``"rows"`` (one dict per mask and mode), ``PRED`` / ``LABEL`` for the key mode (for
    MONAI metrics and handlers) and, for overlays, ``"cases"`` (mode -> the prompted mask indices, their predictions
    and their first prompt, network-frame pixels x, y). Attach :class:`PromptModeMetric` (``key_val_metric``) for
    a scalar mean Dice, and :class:`bundle.engines.handlers.PromptEvaluationReport` for CSV / JSON / PNG output.

    Args:
        prompt_modes: modes to run, see :func:`parse_mode`.
        interactive_start: the first prompt of interactive modes (``"box"`` or ``"points:n"``).
        nsd_tolerance_mm: NSD tolerance in mm (2 mm as MedSAM).
        key_mode: the mode whose predictions go to ``PRED`` (default: the first mode).
        prompt_seed: seed of the point and click samplers (same prompts on every evaluation).
        spacing_key: batch key with the original pixel spacing ``(row, column)`` in mm; missing: 1 mm per pixel
            (then NSD's tolerance is in original pixels, noted in the report).
        modality_key, id_key: batch keys for the modality name and an image identifier (file name).
        valid_size_key: batch key with the original ``(height, width)`` (``original_hw`` from ``ToNetworkFramed``).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        network: PromptableNetwork,
        prompt_modes: Sequence[str] = DEFAULT_MODES,
        interactive_start: str = "points:1",
        nsd_tolerance_mm: float = 2.0,
        key_mode: str | None = None,
        prompt_seed: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        spacing_key: str = "spacing",
        modality_key: str = "modality",
        id_key: str = "image_id",
        valid_size_key: str = "original_hw",
        decollate: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, decollate=decollate, **kwargs)
        self.prompt_modes = [str(m) for m in prompt_modes]
        for mode in self.prompt_modes:
            parse_mode(mode)
        start_kind, _ = parse_mode(interactive_start)
        if start_kind == "interactive":
            raise ValueError(f"interactive_start {interactive_start!r}: expected 'box' or 'points:<n>'")
        self.interactive_start = interactive_start
        self.key_mode = key_mode or self.prompt_modes[0]
        if self.key_mode not in self.prompt_modes:
            raise ValueError(f"key_mode {self.key_mode!r} is not one of prompt_modes {self.prompt_modes}")
        if nsd_tolerance_mm <= 0:
            raise ValueError(f"nsd_tolerance_mm must be > 0, got {nsd_tolerance_mm}")
        self.nsd_tolerance_mm = float(nsd_tolerance_mm)
        self.prompt_seed = int(prompt_seed)
        self.image_key, self.label_key = image_key, label_key
        self.spacing_key, self.modality_key, self.id_key, self.valid_size_key = (
            spacing_key,
            modality_key,
            id_key,
            valid_size_key,
        )
        self._reseed()
        self.add_event_handler(Events.EPOCH_STARTED, lambda _: self._reseed())

    def _reseed(self) -> None:
        """Same prompts at every evaluation (and on every run) for the same data order."""
        self.rng = np.random.RandomState(self.prompt_seed)
        self.generator = torch.Generator().manual_seed(self.prompt_seed)

    def _prompts(self, mode: str, masks: torch.Tensor) -> tuple[dict, int]:
        kind, count = parse_mode(mode)
        if kind == "interactive":
            prompt, _ = self._prompts(self.interactive_start, masks)
            return prompt, count
        if kind == "box":
            return initial_prompts(masks, "box", self.rng, jitter=0), 0
        return initial_prompts(masks, "points", self.rng, num_points=count), 0

    def _iteration(self, engine: SAMUNetEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image, masks, image_index, valid = flatten_masks(
            batchdata, self.image_key, self.label_key, engine.state.device, engine.non_blocking, self.valid_size_key
        )
        b, size = image.shape[0], image.shape[-1]
        n_per_image = masks.shape[0] // b
        modalities = [str(m) for m in _as_list(batchdata.get(self.modality_key), b, "unknown")]
        ids = [str(i) for i in _as_list(batchdata.get(self.id_key), b, None)]
        ids = [f"batch{engine.state.iteration}_{j}" if i == "None" else i for j, i in enumerate(ids)]
        original_hw = _pairs(batchdata.get(self.valid_size_key), b) or [[size, size]] * b
        spacing = _pairs(batchdata.get(self.spacing_key), b)
        frames = [frame_shape(hw, size) for hw in original_hw]
        frame_spacing = [
            [
                (spacing[i][0] if spacing else 1.0) * original_hw[i][0] / frames[i][0],
                (spacing[i][1] if spacing else 1.0) * original_hw[i][1] / frames[i][1],
            ]
            for i in range(b)
        ]
        nonempty = masks.flatten(1).any(dim=1)
        keep = torch.nonzero(nonempty).flatten()
        engine.network.eval()
        step = InteractiveDecoding(unwrap(engine.network))
        rows: list[dict] = []
        cases: dict[str, tuple] = {}
        key_pred = torch.zeros_like(masks)
        amp = torch.autocast("cuda", **engine.amp_kwargs) if engine.amp and image.is_cuda else contextlib.nullcontext()
        with torch.no_grad(), amp:
            features = unwrap(engine.network).encode(image) if keep.numel() else None
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            for mode in self.prompt_modes:
                if not keep.numel():
                    break
                prompt, iterations = self._prompts(mode, masks[keep])
                lows = step(
                    image,
                    masks[keep],
                    image_index[keep],
                    iterations=iterations,
                    valid=valid,
                    generator=self.generator,
                    features=features,
                    **prompt,
                )
                pred = (unwrap(engine.network).upsample_logits(lows[-1].float()) > 0).float()
                cases[mode] = (keep, pred, prompt)
                if mode == self.key_mode:
                    key_pred[keep] = pred
                for row_i, mask_i in enumerate(keep.tolist()):
                    img = mask_i // n_per_image
                    h, w = frames[img]
                    p, g = pred[row_i : row_i + 1, :, :h, :w], masks[mask_i : mask_i + 1, :, :h, :w]
                    dice = float(compute_dice(p, g, include_background=True, ignore_empty=False))
                    nsd = float(
                        compute_surface_dice(
                            p,
                            g,
                            class_thresholds=[self.nsd_tolerance_mm],
                            include_background=True,
                            spacing=frame_spacing[img],
                        )
                    )
                    rows.append(
                        self._row(
                            ids[img],
                            mask_i % n_per_image,
                            modalities[img],
                            mode,
                            "ok",
                            dice,
                            nsd,
                            int(g.sum()),
                            int(p.sum()),
                            img,
                            mask_i,
                        )
                    )
        for mask_i in torch.nonzero(~nonempty).flatten().tolist():
            img = mask_i // n_per_image
            for mode in self.prompt_modes:
                rows.append(
                    self._row(
                        ids[img],
                        mask_i % n_per_image,
                        modalities[img],
                        mode,
                        "empty_mask",
                        math.nan,
                        math.nan,
                        0,
                        0,
                        img,
                        mask_i,
                    )
                )
        engine.state.output = {
            Keys.IMAGE: image,
            Keys.LABEL: masks,
            Keys.PRED: key_pred,
            "rows": rows,
            "cases": cases,
            "image_index": image_index,
            "spacing_given": spacing is not None,
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    @staticmethod
    def _row(
        image_id, mask_index, modality, mode, status, dice, nsd, gt_pixels, pred_pixels, batch_image, flat_index
    ) -> dict:
        return {
            "image": image_id,
            "mask_index": mask_index,
            "modality": modality,
            "mode": mode,
            "status": status,
            "dice": dice,
            "nsd": nsd,
            "gt_pixels": gt_pixels,
            "pred_pixels": pred_pixels,
            "batch_image": batch_image,  # position in the batch (for overlays); not written to the CSV
            "flat_index": flat_index,
        }


class PromptModeMetric(Metric):
    """Mean of a per-mask metric (``"dice"`` or ``"nsd"``) over the non-empty masks of one prompt mode.

    Reads ``output["rows"]`` of :class:`SAMUNetEvaluator`; reduced over ranks under torch.distributed. Use it as the
    evaluator's ``key_val_metric`` (``{"val_mean_dice": PromptModeMetric("box")}``) for best-model checkpoints.
    """

    def __init__(
        self, mode: str = "box", metric: str = "dice", output_transform=lambda out: out["rows"], device="cpu"
    ) -> None:
        parse_mode(mode)
        if metric not in ("dice", "nsd"):
            raise ValueError(f"metric {metric!r}: expected 'dice' or 'nsd'")
        self.mode, self.metric = mode, metric
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, device=self._device)

    @reinit__is_reduced
    def update(self, rows: Sequence[Mapping]) -> None:
        values = [r[self.metric] for r in rows if r["mode"] == self.mode and r["status"] == "ok"]
        self._sum += float(np.nansum(values))
        self._count += int(np.sum(~np.isnan(values))) if values else 0

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum / self._count) if self._count > 0 else math.nan
