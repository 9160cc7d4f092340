"""SA-Med2D-16M names and JSON files, read into MONAI datalists.

Layout (as SA-Med2D-16M releases it): ``images/<prefix>--<dataset>--<case>--<axis>_<slice>.png``
(``--2d_none`` for 2D sources), ``masks/<image stem>--<class:04d>_<instance:03d>.png``. The
image -> masks JSON (``SAMed2D_v1.json``, ``image2label_<split>.json``) drives training; the
mask -> image JSON (``label2image_<split>.json``) drives testing, one mask per item. Relative paths
in a JSON file are resolved against its folder (or ``root``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from ..transforms.masks import sample_masks
from ..transforms.modality import (
    SA_MED2D_PREFIX,
    Modality,
    modality_from_filename,
    modality_from_prefix,
    parse_modality,
)
from .checks import check_files as check_datalist_files

__all__ = [
    "IMAGES_DIR",
    "MASKS_DIR",
    "ALL_IMAGES_JSON",
    "image2label_json",
    "label2image_json",
    "sa_med2d_prefix",
    "SAMed2DName",
    "format_image_name",
    "format_mask_name",
    "parse_name",
    "modality_from_filename",
    "read_image2label",
    "read_label2image",
]

IMAGES_DIR, MASKS_DIR = "images", "masks"
#: The released SA-Med2D-16M image -> masks file name.
ALL_IMAGES_JSON = "SAMed2D_v1.json"

_SLICE = re.compile(r"^(?:(?P<axis>[xyz])_(?P<index>\d+)|2d_none)$")
_MASK = re.compile(r"^(?P<class_id>\d{4})_(?P<instance>\d{3})$")


def image2label_json(split: str) -> str:
    """File name of the image -> masks JSON of a split (SAM-Med2D's ``image2label_train.json``)."""
    return f"image2label_{split}.json"


def label2image_json(split: str) -> str:
    """File name of the mask -> image JSON of a split (SAM-Med2D's ``label2image_test.json``)."""
    return f"label2image_{split}.json"


def sa_med2d_prefix(modality: str | Modality) -> str:
    """File-name prefix for a modality: a name (``"ct"`` -> ``"ct_00"``) or an SA-Med2D prefix kept (``"mr_t2"``)."""
    text = str(modality).strip().lower()
    if text not in {m.value for m in Modality} and modality_from_prefix(text) is not None:
        return text
    return SA_MED2D_PREFIX[parse_modality(text)]


@dataclass(frozen=True)
class SAMed2DName:
    """The fields of an SA-Med2D image or mask file name (``class_id``/``instance`` None for images)."""

    prefix: str
    dataset: str
    case: str
    axis: str | None
    index: int | None
    class_id: int | None = None
    instance: int | None = None

    @property
    def modality(self) -> Modality:
        return parse_modality(self.prefix)

    @property
    def case_id(self) -> str:
        """Dataset-qualified case id, the unit of train/validation/test splits."""
        return f"{self.dataset}--{self.case}"


def _check_part(value: str, what: str) -> str:
    if not value or "--" in value or "/" in value or os.sep in value:
        raise ValueError(f"{what} {value!r}: expected a non-empty name without '--' or path separators")
    return value


def format_image_name(prefix: str, dataset: str, case: str, axis: str | None = None, index: int | None = None) -> str:
    """``<prefix>--<dataset>--<case>--<axis>_<index:04d>.png``; ``--2d_none`` when ``axis`` is None."""
    parse_modality(prefix)  # unknown prefixes fail here, not at training time
    parts = [_check_part(prefix, "modality prefix"), _check_part(dataset, "dataset"), _check_part(case, "case")]
    if axis is None:
        parts.append("2d_none")
    else:
        if axis not in ("x", "y", "z") or index is None or index < 0:
            raise ValueError(f"slice {axis!r}, {index!r}: expected axis x, y or z and an index >= 0")
        parts.append(f"{axis}_{index:04d}")
    return "--".join(parts) + ".png"


def format_mask_name(image_name: str, class_id: int, instance: int) -> str:
    """``<image stem>--<class_id:04d>_<instance:03d>.png``."""
    if not (0 < class_id <= 9999 and 0 <= instance <= 999):
        raise ValueError(f"class {class_id!r}, instance {instance!r}: expected 1..9999 and 0..999")
    return f"{os.path.splitext(os.path.basename(image_name))[0]}--{class_id:04d}_{instance:03d}.png"


def parse_name(path: str | os.PathLike) -> SAMed2DName:
    """Parse an SA-Med2D image or mask file name; ValueError naming the file if it does not follow the pattern."""
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    parts = stem.split("--")
    mask = _MASK.match(parts[-1]) if len(parts) == 5 else None
    if mask:
        parts = parts[:-1]
    slice_match = _SLICE.match(parts[-1]) if len(parts) == 4 else None
    if slice_match is None:
        raise ValueError(
            f"{os.fspath(path)}: not an SA-Med2D name; expected <modality>--<dataset>--<case>--<axis>_<slice>"
            "[--<class>_<instance>].png"
        )
    index = slice_match.group("index")
    return SAMed2DName(
        parts[0],
        parts[1],
        parts[2],
        slice_match.group("axis"),
        None if index is None else int(index),
        int(mask.group("class_id")) if mask else None,
        int(mask.group("instance")) if mask else None,
    )


def _read_json(path: str | os.PathLike, value_type: type) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such SA-Med2D JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level is {type(data).__name__}; expected an object mapping paths")
    for key, value in data.items():
        if value_type is str:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not ok:
            expected = "a path" if value_type is str else "a list of paths"
            raise ValueError(f"{path}: entry {key!r} maps to {value!r}; expected {expected}")
    return data


def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))


def _item(image: str, json_path: str, default_modality: str | None) -> dict:
    modality = modality_from_filename(image)
    if modality is None:
        if default_modality is None:
            raise ValueError(
                f"{json_path}: modality of {image!r} unknown (not an SA-Med2D name); pass default_modality"
            )
        modality = parse_modality(default_modality)
    try:
        case = parse_name(image).case_id
    except ValueError:
        case = os.path.splitext(os.path.basename(image))[0]  # a 2D source: each image is its own case
    return {"image": image, "modality": modality.value, "case": case}


def read_image2label(
    json_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    masks_per_image: int | None = None,
    seed: int | None = 0,
    default_modality: str | None = None,
    check_files: bool = False,
) -> list[dict]:
    """Datalist from an image -> masks JSON: ``{"image", "label": [mask paths], "modality", "case"}``.

    ``masks_per_image`` keeps k masks per image, sampled with ``seed`` as SAM-Med2D does (with
    replacement); for new masks every epoch use `bundle.transforms.RandSampleMasksd` instead.
    An image with no masks is a ValueError (an image -> masks file lists images with masks only), and so is a file
    that lists no image (nothing to train on).
    """
    json_path = os.fspath(json_path)
    data = _read_json(json_path, list)
    if not data:
        raise ValueError(f"{json_path}: lists no images; expected {{image path: [mask paths]}} with at least one image")
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(json_path))
    state = None if masks_per_image is None else np.random.RandomState(seed)
    items = []
    for image, masks in data.items():
        if not masks:
            raise ValueError(f"{json_path}: image {image!r} has no masks")
        item = _item(_resolve(base, image), json_path, default_modality)
        labels = [_resolve(base, m) for m in masks]
        item["label"] = labels if state is None else sample_masks(labels, masks_per_image, state)
        items.append(item)
    return check_datalist_files(items, ("image", "label"), what=json_path) if check_files else items


def read_label2image(
    json_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    default_modality: str | None = None,
    check_files: bool = False,
) -> list[dict]:
    """Datalist from a mask -> image JSON, one item per mask: ``{"image", "label", "modality", "case", "class_id"}``.

    ``class_id`` comes from an SA-Med2D mask name (None for other names).
    """
    json_path = os.fspath(json_path)
    data = _read_json(json_path, str)
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(json_path))
    items = []
    for mask, image in data.items():
        item = _item(_resolve(base, image), json_path, default_modality)
        item["label"] = _resolve(base, mask)
        try:
            item["class_id"] = parse_name(mask).class_id
        except ValueError:
            item["class_id"] = None
        items.append(item)
    return check_datalist_files(items, ("image", "label"), what=json_path) if check_files else items
