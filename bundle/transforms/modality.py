"""Imaging modality names and how a modality is found: config, datalist field, DICOM tag, file name, and for CT
the Hounsfield range of the intensities; intensities that contradict the chosen modality are refused.

The SA-Med2D-16M naming rules themselves (``<modality>--<dataset>--<case>--<axis>_<slice>``) live
here too, because both the transforms (modality from a file name) and ``bundle.data`` need them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from enum import Enum

import numpy as np

__all__ = [
    "Modality",
    "PHOTOGRAPHIC",
    "SA_MED2D_PREFIX",
    "parse_modality",
    "modality_from_dicom",
    "modality_from_prefix",
    "modality_from_filename",
    "modality_from_meta",
    "resolve_modality",
    "looks_like_hounsfield",
    "check_intensities",
]

logger = logging.getLogger(__name__)

#: intensities at or below this are air in Hounsfield units; MR, PET and 8-bit images have none so low
AIR_HU = -500.0
#: the share of voxels at or below ``AIR_HU`` that makes a volume CT in HU (air around and inside the body)
AIR_FRACTION = 0.01


class Modality(str, Enum):
    """Modality names used across the bundle (configs and datalists use the string values)."""

    CT = "ct"
    MR = "mr"
    PET = "pet"
    XRAY = "xray"
    ULTRASOUND = "ultrasound"
    ENDOSCOPY = "endoscopy"
    DERMOSCOPY = "dermoscopy"
    FUNDUS = "fundus"

    def __str__(self) -> str:
        return self.value


#: Modalities stored as 8-bit display images: no windowing, only channel handling.
PHOTOGRAPHIC = frozenset({Modality.XRAY, Modality.ULTRASOUND, Modality.ENDOSCOPY, Modality.DERMOSCOPY, Modality.FUNDUS})

#: SA-Med2D-16M file-name prefix written for each modality by the converter.
SA_MED2D_PREFIX = {
    Modality.CT: "ct_00",
    Modality.MR: "mr_00",
    Modality.PET: "pet_00",
    Modality.XRAY: "x_ray",
    Modality.ULTRASOUND: "ultrasound_00",
    Modality.ENDOSCOPY: "endoscopy_00",
    Modality.DERMOSCOPY: "dermoscopy_00",
    Modality.FUNDUS: "fundus_photography",
}

# SA-Med2D prefixes start with these (mr_t1, mr_t2, mr_flair, mr_adc ... are all MR).
_PREFIX_STARTS = (
    ("ct_", Modality.CT),
    ("mr_", Modality.MR),
    ("pet_", Modality.PET),
    ("x_ray", Modality.XRAY),
    ("ultrasound", Modality.ULTRASOUND),
    ("endoscopy", Modality.ENDOSCOPY),
    ("dermoscopy", Modality.DERMOSCOPY),
    ("fundus", Modality.FUNDUS),
)

# DICOM (0008,0060) Modality codes; projection radiography codes all map to X-ray.
_DICOM_CODES = {
    "CT": Modality.CT,
    "MR": Modality.MR,
    "PT": Modality.PET,
    "CR": Modality.XRAY,
    "DX": Modality.XRAY,
    "RG": Modality.XRAY,
    "MG": Modality.XRAY,
    "RF": Modality.XRAY,
    "XA": Modality.XRAY,
    "US": Modality.ULTRASOUND,
    "ES": Modality.ENDOSCOPY,
    "OP": Modality.FUNDUS,
}

_ALIASES = {
    "mri": Modality.MR,
    "pt": Modality.PET,
    "x_ray": Modality.XRAY,
    "x-ray": Modality.XRAY,
    "us": Modality.ULTRASOUND,
    "fundus_photography": Modality.FUNDUS,
}

# Keys under which readers store the DICOM Modality tag: ITK ("0008|0060"), MONAI's
# PydicomReader ("00080060" as DICOM JSON), or a plain "Modality" entry.
_DICOM_MODALITY_KEYS = ("0008|0060", "00080060", "Modality")


def parse_modality(value: str | Modality) -> Modality:
    """Return the `Modality` for a name, alias or SA-Med2D prefix; ValueError listing valid names otherwise."""
    if isinstance(value, Modality):
        return value
    text = str(value).strip().lower()
    try:
        return Modality(text)
    except ValueError:
        pass
    found = _ALIASES.get(text) or modality_from_prefix(text)
    if found is not None:
        return found
    raise ValueError(
        f"unknown modality {value!r}; expected one of {[m.value for m in Modality]} "
        f"or an SA-Med2D prefix such as {sorted(SA_MED2D_PREFIX.values())}"
    )


def modality_from_dicom(code: str) -> Modality | None:
    """Map a DICOM Modality code (e.g. "CT", "PT", "DX") to a `Modality`; None when unmapped."""
    return _DICOM_CODES.get(str(code).strip().upper())


def modality_from_prefix(prefix: str) -> Modality | None:
    """Modality of an SA-Med2D prefix (``ct_00``, ``mr_t2``, ``x_ray`` ...); None if unrecognised."""
    text = prefix.strip().lower()
    return next((modality for start, modality in _PREFIX_STARTS if text.startswith(start)), None)


def modality_from_filename(path: str | os.PathLike) -> Modality | None:
    """Modality from an SA-Med2D file name (``ct_00--Dataset--Case--z_0040.png``); None if not one."""
    parts = os.path.basename(os.fspath(path)).split("--")
    return modality_from_prefix(parts[0]) if len(parts) >= 3 else None


def _dicom_code(meta: Mapping) -> str | None:
    for key in _DICOM_MODALITY_KEYS:
        value = meta.get(key)
        if isinstance(value, Mapping):  # DICOM JSON: {"vr": "CS", "Value": ["CT"]}
            value = (value.get("Value") or [None])[0]
        if value:
            return str(value)
    return None


def modality_from_meta(meta: Mapping | None) -> Modality | None:
    """Modality from image metadata: the DICOM Modality tag first, then an SA-Med2D file name."""
    if not meta:
        return None
    code = _dicom_code(meta)
    found = modality_from_dicom(code) if code is not None else None
    if found is not None:
        return found
    filename = meta.get("filename_or_obj")
    return modality_from_filename(filename) if isinstance(filename, (str, os.PathLike)) else None


def looks_like_hounsfield(intensities) -> bool:
    """Whether an intensity array is a CT in Hounsfield units: at least ``AIR_FRACTION`` of it is air."""
    values = np.asarray(intensities)
    return bool(values.size) and float((values <= AIR_HU).mean()) >= AIR_FRACTION


def check_intensities(intensities, modality: Modality, source: str = "image") -> None:
    """Refuse an image that cannot be segmented as ``modality``: a constant one (any modality), or one in Hounsfield
    units (much air) given as MR or PET, which would be normalised as nonsense. ValueError naming ``source``."""
    values = np.asarray(intensities)
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise ValueError(f"{source}: the image is constant (every value {low:g}); there is nothing to segment")
    if modality in (Modality.MR, Modality.PET) and looks_like_hounsfield(values):
        air = float((values <= AIR_HU).mean())
        raise ValueError(
            f"{source}: given as {modality.value}, but {air:.0%} of its values are <= {AIR_HU:g} (range {low:g} to "
            f"{high:g}), the air of a CT in Hounsfield units; give modality ct if it is a CT"
        )


def resolve_modality(
    meta: Mapping | None,
    configured: str | Modality | None = None,
    field: str | Modality | None = None,
    default: str | Modality | None = None,
    source: str = "image",
    intensities=None,
) -> Modality:
    """Pick the modality: configured value, then datalist field, then metadata, then (given ``intensities``, the
    image's values) CT when they are in Hounsfield units, then default; the choice is logged.

    Raises ValueError naming ``source`` when none of them gives a modality or a value is unknown.
    """
    try:
        for value in (configured, field):
            if value is not None and str(value) != "":
                return parse_modality(value)
        found = modality_from_meta(meta)
        if found is not None:
            logger.info("%s: modality %s, from its metadata", source, found.value)
            return found
        if intensities is not None and looks_like_hounsfield(intensities):
            logger.info(
                "%s: modality ct, inferred from its intensities (Hounsfield units: air below %g)", source, AIR_HU
            )
            return Modality.CT
        if default is not None:
            return parse_modality(default)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    code = _dicom_code(meta or {})
    detail = f" (DICOM Modality {code!r} is not mapped)" if code else ""
    raise ValueError(
        f"{source}: modality unknown{detail}; set it in the config (modality=...), a datalist "
        f"'modality' field, an SA-Med2D file name prefix, or configure default_modality"
    )
