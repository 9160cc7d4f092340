"""Datalists: SA-Med2D-16M JSON files, 3D volume -> 2D slices, case-level splits, the SA-Med2D converter, file
checks and the cached datasets the configs build."""

from .checks import check_files
from .convert import Case, ConversionReport, case_name, convert_to_sa_med2d
from .datasets import CACHE_CHOICES, cached_dataset
from .encoded import EncodedViews, task_dataset
from .resumable import ResumableSampler, SeededDraws
from .sa_med2d import (
    ALL_IMAGES_JSON,
    IMAGES_DIR,
    MASKS_DIR,
    SAMed2DName,
    format_image_name,
    format_mask_name,
    image2label_json,
    label2image_json,
    modality_from_filename,
    parse_name,
    read_image2label,
    read_label2image,
    sa_med2d_prefix,
)
from .slices import load_volume_datalist, volume_slice_datalist
from .splits import SPLITS, split_cases, split_datalist
from .volumes import (
    AXES,
    MIN_COMPONENT_FRACTION,
    InstanceMask,
    LabelledSlice,
    check_same_grid,
    instance_masks,
    iter_labelled_slices,
    load_labelled_volume,
    take_slice,
)

__all__ = [
    "CACHE_CHOICES",
    "cached_dataset",
    "EncodedViews",
    "task_dataset",
    "ResumableSampler",
    "SeededDraws",
    "check_files",
    "load_volume_datalist",
    "volume_slice_datalist",
    "Case",
    "ConversionReport",
    "case_name",
    "convert_to_sa_med2d",
    "ALL_IMAGES_JSON",
    "IMAGES_DIR",
    "MASKS_DIR",
    "SAMed2DName",
    "format_image_name",
    "format_mask_name",
    "image2label_json",
    "label2image_json",
    "modality_from_filename",
    "parse_name",
    "read_image2label",
    "read_label2image",
    "sa_med2d_prefix",
    "SPLITS",
    "split_cases",
    "split_datalist",
    "AXES",
    "MIN_COMPONENT_FRACTION",
    "InstanceMask",
    "LabelledSlice",
    "check_same_grid",
    "instance_masks",
    "iter_labelled_slices",
    "load_labelled_volume",
    "take_slice",
]
