"""Labelled volumes (NIfTI / NRRD / MHA / DICOM + label map) -> the SA-Med2D-16M layout.

Writes into ``output_dir``::

    images/<prefix>--<dataset>--<case>--<axis>_<slice>.png     8-bit grey, normalised per modality
    masks/<image stem>--<class:04d>_<instance:03d>.png         0 / 255, one per connected component
    SAMed2D_v1.json                                            image -> masks, all splits
    image2label_<split>.json, label2image_<split>.json         per split (train, validation, test)
    splits.json, report.json                                   case ids per split; counts and skips

Only slices with at least one kept component get an image. Skips are counted in the report, never
silent: components under SA-Med2D's size rule, slices whose every component was dropped, and cases
whose label map is empty. Splits are by case, so no case is in two splits. The output is built in a
temporary folder beside ``output_dir`` and moved into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..io import LoadMedicalImage, strip_extensions
from ..quiet import quiet_third_party
from ..transforms.intensity import ModalityNormalize
from ..transforms.modality import parse_modality, resolve_modality
from .sa_med2d import (
    ALL_IMAGES_JSON,
    IMAGES_DIR,
    MASKS_DIR,
    format_image_name,
    format_mask_name,
    image2label_json,
    label2image_json,
    sa_med2d_prefix,
)
from .splits import SPLITS, split_cases
from .volumes import AXES, MIN_COMPONENT_FRACTION, iter_labelled_slices, load_labelled_volume

__all__ = ["Case", "ConversionReport", "case_name", "convert_to_sa_med2d", "build_parser", "main"]

logger = logging.getLogger(__name__)


@dataclass
class Case:
    """One labelled volume. ``modality`` is a modality name or SA-Med2D prefix (None: DICOM tag or the default)."""

    image: str
    label: str
    case: str
    modality: str | None = None


@dataclass
class ConversionReport:
    """What a conversion wrote and what it skipped."""

    splits: dict[str, list[str]]
    images: int = 0
    masks: int = 0
    images_per_axis: dict[str, int] = field(default_factory=dict)
    dropped_components: int = 0
    slices_all_dropped: int = 0
    empty_cases: list[str] = field(default_factory=list)
    cases_all_dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {len(cases)}" for name, cases in self.splits.items())
        return (
            f"{self.images} images ({self.images_per_axis}), {self.masks} masks; cases: {sizes}; skipped: "
            f"{self.dropped_components} small components, {self.slices_all_dropped} slices with only small "
            f"components, {len(self.empty_cases)} cases with an empty label map {self.empty_cases}, "
            f"{len(self.cases_all_dropped)} cases with only small components {self.cases_all_dropped}"
        )


def case_name(image_path: str | os.PathLike) -> str:
    """Case id from an image path: the file name without its volume suffix, or a DICOM folder's name."""
    return strip_extensions(os.path.normpath(os.fspath(image_path)))


def _prepare_output(output_dir: str) -> str:
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"{output_dir}: output exists and is not an empty folder; choose a new output folder")
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.partial-", dir=parent)
    os.makedirs(os.path.join(work, IMAGES_DIR))
    os.makedirs(os.path.join(work, MASKS_DIR))
    return work


def _save_png(array: np.ndarray, path: str, source: str) -> None:
    if os.path.exists(path):
        raise ValueError(
            f"{source}: output {os.path.basename(path)} already written by another case; case ids must be unique"
        )
    Image.fromarray(array).save(path)


def _write_json(data, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def convert_to_sa_med2d(
    cases: Sequence[Case],
    output_dir: str | os.PathLike,
    dataset: str,
    axes: Sequence[str] = ("z",),
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    modality: str | None = None,
    window: str | Sequence[float] = "soft_tissue",
    percentiles: Sequence[float] = (0.5, 99.5),
    min_fraction: float = MIN_COMPONENT_FRACTION,
    progress: bool = True,
) -> ConversionReport:
    """Convert ``cases`` into the SA-Med2D layout under ``output_dir`` (see the module docstring).

    ``modality`` is the default for cases without one and without a DICOM Modality tag; CT uses
    ``window``, MR/PET ``percentiles`` (see `ModalityNormalize`). Raises ValueError naming the file
    for unreadable inputs, label grids that differ from the image grid, or unknown modalities.
    """
    output_dir = os.fspath(output_dir)
    if not cases:
        raise ValueError("no cases to convert")
    unknown = [a for a in axes if a not in AXES]
    if unknown or not axes:
        raise ValueError(f"slicing axes {list(axes)!r}: expected one or more of {sorted(AXES)}")
    for case in cases:  # bad dataset / case names fail before any work
        format_image_name("ct_00", dataset, case.case)
    normalizer = ModalityNormalize(window=window, percentiles=percentiles, out_channels=1)
    splits = split_cases([c.case for c in cases], fractions, seed)
    report = ConversionReport(splits=splits, images_per_axis=dict.fromkeys(axes, 0))
    split_of = {case: name for name, members in report.splits.items() for case in members}
    all_images: dict[str, list[str]] = {}
    image2label: dict[str, dict[str, list[str]]] = {name: {} for name in SPLITS}
    loader = LoadMedicalImage()
    work = _prepare_output(output_dir)
    try:
        bar = tqdm(cases, desc="cases", unit="case", file=sys.stderr, disable=not progress)
        for case in bar:
            image, label = load_labelled_volume(case.image, case.label, loader)
            mod = resolve_modality(image.meta, field=case.modality, default=modality, source=case.image)
            given = case.modality or modality
            prefix = sa_med2d_prefix(given if given and parse_modality(given) == mod else mod)
            if not bool((label > 0).any()):
                report.empty_cases.append(case.case)
                logger.warning("%s: label map %s is empty; case skipped", case.case, case.label)
                continue
            grey = np.rint(normalizer.normalize(image, mod, case.image).numpy()).astype(np.uint8)
            written, lost, slice_shape = 0, 0, None
            for s in iter_labelled_slices(grey, label, axes, min_fraction):
                report.dropped_components += s.dropped
                if not s.masks:
                    report.slices_all_dropped += 1
                    lost, slice_shape = lost + 1, s.image.shape[-2:]
                    continue
                name = format_image_name(prefix, dataset, case.case, s.axis, s.index)
                _save_png(np.ascontiguousarray(s.image[0]), os.path.join(work, IMAGES_DIR, name), case.image)
                mask_paths = []
                for m in s.masks:
                    mask_name = format_mask_name(name, m.class_id, m.instance)
                    _save_png(m.mask.astype(np.uint8) * 255, os.path.join(work, MASKS_DIR, mask_name), case.label)
                    mask_paths.append(f"{MASKS_DIR}/{mask_name}")
                key = f"{IMAGES_DIR}/{name}"
                all_images[key] = mask_paths
                image2label[split_of[case.case]][key] = mask_paths
                report.images_per_axis[s.axis] += 1
                report.masks += len(mask_paths)
                written += 1
            report.images += written
            if not written and lost:
                report.cases_all_dropped.append(case.case)
                logger.warning(
                    "%s: no image written: every component on its %d labelled slice(s) is smaller than SA-Med2D's "
                    "size rule (min_fraction %.3g of the slice area: %.0f px of a %d x %d slice; 100 px at 256 x 256); "
                    "lower --min-fraction (0 keeps every component) to keep them",
                    case.case,
                    lost,
                    min_fraction,
                    min_fraction * slice_shape[0] * slice_shape[1],
                    *slice_shape,
                )
            if progress:
                bar.write(f"{case.case} ({split_of[case.case]}, {prefix}): {written} images", file=sys.stderr)
        if not report.images:
            raise ValueError(f"no image written, nothing to train on: {report.summary()}")
        _write_json(all_images, os.path.join(work, ALL_IMAGES_JSON))
        for name, mapping in image2label.items():
            _write_json(mapping, os.path.join(work, image2label_json(name)))
            inverse = {m: image for image, masks in mapping.items() for m in masks}
            _write_json(inverse, os.path.join(work, label2image_json(name)))
        _write_json(report.splits, os.path.join(work, "splits.json"))
        _write_json(asdict(report), os.path.join(work, "report.json"))
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.replace(work, output_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _window(text: str):
    if "," in text:
        width, level = text.split(",", 1)
        return float(width), float(level)
    return text


def _cases_from_args(args: argparse.Namespace) -> list[Case]:
    cases = [Case(image, label, case_name(image)) for image, label in args.pair or []]
    if args.datalist:
        try:
            with open(args.datalist, encoding="utf-8") as f:
                items = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{args.datalist}: not valid JSON ({err})") from err
        if not isinstance(items, list):
            raise ValueError(f"{args.datalist}: expected a JSON list of cases")
        base = os.path.dirname(os.path.abspath(args.datalist))
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise ValueError(f"{args.datalist}: item {i} needs 'image' and 'label'")
            image, label = (os.path.join(base, item[k]) for k in ("image", "label"))
            cases.append(Case(image, label, item.get("case") or case_name(image), item.get("modality")))
    if not cases:
        raise ValueError("no input: give --pair IMAGE LABEL (repeatable) and/or --datalist FILE")
    return cases


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``scripts/prepare_sa_med2d.py``."""
    parser = argparse.ArgumentParser(
        prog="prepare_sa_med2d.py",
        description="Convert labelled 3D volumes (NIfTI, NRRD, MHA, DICOM series + label map) into the SA-Med2D-16M "
        "layout: images/, masks/, SAMed2D_v1.json, image2label_<split>.json, label2image_<split>.json, with "
        "case-level train/validation/test splits.",
    )
    add = parser.add_argument
    add("--pair", nargs=2, action="append", metavar=("IMAGE", "LABEL"), help="one case (repeatable); id = file name")
    add("--datalist", help='JSON list of {"image", "label", optional "case", "modality"}; paths relative to it')
    add("--output", required=True, help="new or empty output folder")
    add("--dataset", required=True, help="dataset name used in file names")
    add("--modality", help="modality (ct, mr, pet, ...) or SA-Med2D prefix (mr_t2, ...) for cases without one")
    add("--axes", nargs="+", choices=sorted(AXES), default=["z"], help="slicing axes (array axes 0, 1, 2)")
    add("--split", nargs=3, type=float, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"), help="case shares")
    add("--seed", type=int, default=0, help="seed of the case split")
    add(
        "--window",
        type=_window,
        default="soft_tissue",
        help="CT window preset (soft_tissue, abdomen, lung, bone, brain) or WIDTH,LEVEL",
    )
    add("--percentiles", nargs=2, type=float, default=[0.5, 99.5], metavar=("LOW", "HIGH"), help="MR/PET clipping")
    add(
        "--min-fraction",
        type=float,
        default=MIN_COMPONENT_FRACTION,
        help="drop components under this fraction of the slice area (default: SA-Med2D's 100 px at 256 x 256)",
    )
    add("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter CLI; returns the exit status (0 done, 1 input error)."""
    args = build_parser().parse_args(argv)
    quiet_third_party()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        report = convert_to_sa_med2d(
            _cases_from_args(args),
            args.output,
            args.dataset,
            axes=args.axes,
            fractions=args.split,
            seed=args.seed,
            modality=args.modality,
            window=args.window,
            percentiles=args.percentiles,
            min_fraction=args.min_fraction,
            progress=not args.quiet,
        )
    except (ValueError, OSError) as err:
        print(f"prepare_sa_med2d.py: error: {err}", file=sys.stderr)
        return 1
    print(f"{args.output}: {report.summary()}")
    return 0
