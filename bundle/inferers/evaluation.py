"""Label maps against their ground truth: Dice and NSD per label, for datalists of several objects per image.

:class:`ObjectEvaluator` (``object_evaluator`` of ``configs/evaluate.json``, run with ``--eval_datalist``) takes a
datalist of images with a ground-truth label map (``label``: a label volume, or a 2D mask; 0/255 is label 1) and
optional prompts (``objects``, a top-level prompt or ``mask_prompt``, as inference takes them, each object's
``label`` naming the ground-truth label it segments). An item without prompts is prompted from its ground truth,
MedSAM's protocol: one object per label, its bounding box (3D for volumes), with no mask fed to the decoder. Every
image is segmented by the inference config's inferer through :class:`VolumeInferenceRunner` (its label maps are
written under ``<output_dir>/masks``), then each label is compared with MONAI's ``compute_dice`` and
``compute_surface_dice`` (NSD, ``nsd_tolerance_mm`` with the ground truth's voxel spacing; in pixels for 2D display
images, which have none). A label in only one of the two maps scores 0; none is skipped.

Written: ``per_label.csv`` (image, label map, label, name, voxels, Dice, NSD) and ``summary.json`` (means per label name and
over all labels).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bundle.io import atomic_write, is_display_file, load_image

from .mask_prompts import label_values, load_mask_prompt
from .objects import has_prompt
from .slice_inferer import PromptedSliceInferer
from .volume import VolumeInferenceRunner

logger = logging.getLogger(__name__)


def dice_nsd(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0):
    """Dice and NSD of one binary 2D or 3D prediction (``spacing`` per axis, in mm), with MONAI's metrics; an empty
    prediction of a non-empty truth (or the reverse) scores 0."""
    from monai.metrics import compute_dice, compute_surface_dice

    def one_hot(mask):
        foreground = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
        return torch.cat([1 - foreground, foreground], dim=1)

    y_pred, y = one_hot(pred), one_hot(truth)
    dice = compute_dice(y_pred, y, include_background=False, ignore_empty=False)
    nsd = compute_surface_dice(y_pred, y, [tolerance_mm], include_background=False, spacing=list(spacing))
    # MONAI gives NaN NSD when one surface is missing: no overlap of surfaces means 0
    return float(dice), float(nsd) if torch.isfinite(nsd).all() else 0.0


def object_evaluator(network, datalist, output_dir: str, **kwargs) -> ObjectEvaluator:
    """An :class:`ObjectEvaluator` of ``datalist`` (a JSON file or list; nothing when ``None``) with ``network`` in
    the inferer of the bundle's ``configs/inference.json``, so evaluation segments exactly as inference does."""
    from bundle.config import bundle_parser

    from .volume import build_datalist

    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    inferer = bundle_parser(overrides={"network": network, "device": device}).get_parsed_content("inferer")
    return ObjectEvaluator(inferer, build_datalist(datalist=datalist), output_dir, **kwargs)


class ObjectEvaluator:
    """Segment a datalist of images with ground truth and report Dice and NSD per label (see the module docstring).

    Args:
        inferer: the inference config's :class:`PromptedSliceInferer` (with the network to evaluate).
        dataset: items from :func:`bundle.inferers.build_datalist`, each with a ground-truth ``label``.
        output_dir: where the label maps, ``per_label.csv`` and ``summary.json`` go.
        nsd_tolerance_mm: NSD tolerance (MedSAM: 2 mm).
        axis, modality, default_modality: as :class:`VolumeInferenceRunner`.
    """

    def __init__(
        self,
        inferer: PromptedSliceInferer,
        dataset: Sequence[dict],
        output_dir: str,
        nsd_tolerance_mm: float = 2.0,
        axis: int | None = None,
        modality: str | None = None,
        default_modality: str | None = None,
    ) -> None:
        if nsd_tolerance_mm <= 0:
            raise ValueError(f"nsd_tolerance_mm must be > 0, got {nsd_tolerance_mm}")
        self.inferer = inferer
        self.dataset = list(dataset or [])
        self.output_dir = Path(output_dir)
        self.nsd_tolerance_mm = float(nsd_tolerance_mm)
        self.runner_args = {"axis": axis, "modality": modality, "default_modality": default_modality}
        self.rows: list[dict] = []

    def _truths(self) -> dict[str, tuple[np.ndarray, list[float]]]:
        """Every item's ground truth, read and checked before any inference: image path -> (label map, spacing)."""
        if not self.dataset:
            raise ValueError("nothing to evaluate: give --eval_datalist FILE (items with image and label)")
        truths: dict[str, tuple[np.ndarray, list[float]]] = {}
        sources: dict[str, str] = {}
        for item in self.dataset:
            image_path = os.path.abspath(item["image"])
            if not item.get("label"):
                raise ValueError(f"{item['image']}: no ground truth: give each evaluation item a label file")
            label_path = os.path.abspath(item["label"])
            if sources.setdefault(image_path, label_path) != label_path:
                raise ValueError(
                    f"{item['image']}: listed with two ground truths {sources[image_path]} and {label_path}"
                )
            if image_path in truths:
                continue
            image = load_image(image_path)
            spatial = tuple(image.shape[1:])
            truth = load_mask_prompt(label_path, spatial, allow_empty=True)
            spacing = [1.0] * len(spatial) if is_display_file(image_path) else [float(v) for v in image.pixdim]
            truths[image_path] = (truth, spacing)
        return truths

    def _prompted(self, truths) -> tuple[list[dict], list[dict]]:
        """The items with their own prompts, and the others prompted from their ground truth (one box per label)."""
        given, from_truth = [], []
        for item in self.dataset:
            if has_prompt(item) or item.get("objects") is not None:
                given.append(item)
                continue
            truth, _ = truths[os.path.abspath(item["image"])]
            values = label_values(truth, item["label"])
            if not values:
                raise ValueError(f"{item['image']}: its ground truth is empty, so it gives no box; give prompts")
            objects = []
            for value in values:
                if truth.ndim == 3 and truth.shape[-1] > 1:  # a volume: the label's 3D box
                    coords = np.nonzero(truth == value)
                    objects.append({"box": [int(c.min()) for c in coords] + [int(c.max()) for c in coords]})
                else:  # a 2D image: its box, taken as a mask prompt takes it (the mask itself is not fed)
                    objects.append({"mask_prompt": item["label"], "mask_label": value})
                objects[-1]["label"] = value
            rest = {k: v for k, v in item.items() if k in ("image", "modality", "label", "dataset")}
            from_truth.append({**rest, "objects": objects})
        return given, from_truth

    def run(self) -> dict:
        """Segment, compare, write the reports; returns the summary."""
        truths = self._truths()
        given, from_truth = self._prompted(truths)
        results = []
        switch = self.inferer.mask_inputs
        for items, mask_inputs in ((given, switch), (from_truth, False)):
            if not items:
                continue
            self.inferer.mask_inputs = mask_inputs
            try:
                runner = VolumeInferenceRunner(self.inferer, items, str(self.output_dir / "masks"), **self.runner_args)
                results += runner.run()
            finally:
                self.inferer.mask_inputs = switch
        self.rows = [row for result in results for row in self._compare(result, truths)]
        summary = self._summary()
        self._write(summary)
        return summary

    def _compare(self, result: dict, truths) -> list[dict]:
        truth, spacing = truths[os.path.abspath(result["image"])]
        pred = np.asarray(load_mask_prompt(result["mask"], truth.shape, allow_empty=True))
        names = {v: n for n, v in result.get("label_names", {}).items()} or {1: "label_1"}
        rows = []
        for value in sorted(set(label_values(truth, result["image"])) | set(label_values(pred, result["mask"]))):
            dice, nsd = dice_nsd(pred == value, truth == value, spacing, self.nsd_tolerance_mm)
            rows.append(
                {
                    "image": result["image"],
                    "mask": result["mask"],
                    "label": value,
                    "name": names.get(value, f"label_{value}"),
                    "gt_voxels": int((truth == value).sum()),
                    "pred_voxels": int((pred == value).sum()),
                    "dice": dice,
                    "nsd": nsd,
                }
            )
        return rows

    def _summary(self) -> dict:
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in self.rows:
            groups[row["name"]].append(row)
        groups["all"] = self.rows

        def stats(rows):
            return {
                "n": len(rows),
                "dice_mean": float(np.mean([r["dice"] for r in rows])) if rows else math.nan,
                "nsd_mean": float(np.mean([r["nsd"] for r in rows])) if rows else math.nan,
            }

        summary = {
            "labels": {name: stats(rows) for name, rows in groups.items() if name != "all"},
            "all": stats(groups["all"]),
            "nsd_tolerance_mm": self.nsd_tolerance_mm,
            "images": len({r["image"] for r in self.rows}),
        }
        for name, s in summary["labels"].items():
            logger.info("%s: Dice %.4f NSD %.4f over %d images", name, s["dice_mean"], s["nsd_mean"], s["n"])
        return summary

    def _write(self, summary: dict) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fields = ["image", "mask", "label", "name", "gt_voxels", "pred_voxels", "dice", "nsd"]
        with atomic_write(self.output_dir / "per_label.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        with atomic_write(self.output_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        logger.info("per-label Dice and NSD written to %s", self.output_dir)
