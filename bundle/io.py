"""Files in and out: the suffix table, image loaders, geometry-exact mask writers and the one atomic write.

Reading goes through MONAI ``LoadImage``: volumes (NIfTI, NRRD, MHA, DICOM files and series folders) keep MONAI's
ITK / nibabel axis order ``[C, i, j(, k)]`` with no reorientation (prompts are indices of that array), DICOM tags
are kept (``"0008|0060"`` is the Modality); 2D display images (PNG, JPG, BMP) are read by ``PILReader`` as
``LoadImage`` reads them, ``[C, x, y]`` (column first: ``array[:, x, y]`` is the pixel in column x, row y), so a 2D
image is indexed like a volume slice; inference shows it to the network upright (rows = y), training configs
transpose it to ``[C, y, x]`` (docs/README.md, "Coordinates and orientation").

Every file the bundle writes (masks, montages, reports, checkpoints it publishes) goes through :func:`atomic_write`:
it is written under a hidden temporary name beside its destination (``.<name>.tmp-<8 hex><suffix>``) and renamed
into place, so a failed or killed write never leaves a truncated file under the destination's name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform, Transform

logger = logging.getLogger(__name__)

__all__ = [
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "DISPLAY_SUFFIXES",
    "VOLUME_SUFFIXES",
    "KNOWN_SUFFIXES",
    "LABEL_SUFFIXES",
    "TEMP_MARKER",
    "remove_stale_temps",
    "image_suffix",
    "strip_extensions",
    "is_display_file",
    "atomic_write",
    "LoadMedicalImage",
    "LoadMedicalImaged",
    "load_image",
    "ReferenceGeometry",
    "atomic_writer",
    "mask_data",
    "write_mask",
]

# ----------------------------------------------------------------------------------------------------- suffix table
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
#: 8-bit 2D display images
DISPLAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
KNOWN_SUFFIXES = VOLUME_SUFFIXES + DISPLAY_SUFFIXES
#: single-file volume formats that label maps are uploaded and returned in
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: part of every temporary file name :func:`atomic_write` uses
TEMP_MARKER = ".tmp-"


def image_suffix(path: str | os.PathLike) -> str:
    """The known image suffix of ``path``, lower case (``".nii.gz"``, ``".nrrd"``, ...), or ``""``."""
    lower = os.fspath(path).lower()
    return next((suffix for suffix in KNOWN_SUFFIXES if lower.endswith(suffix)), "")


def strip_extensions(path: str | os.PathLike) -> str:
    """File name without its image suffix (``a.nii.gz`` -> ``a``; a DICOM folder keeps its name)."""
    name = Path(os.fspath(path).rstrip("/\\")).name
    suffix = image_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


def is_display_file(path) -> bool:
    """True for a 2D display image file (PNG/JPG/BMP), whose values are already 8-bit."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(DISPLAY_SUFFIXES)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path`` atomically.

    The temporary name keeps the destination's suffix (writers choose the format from it) and is hidden. If the
    block raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = image_suffix(path.name) or path.suffix
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.parent / f".{stem}{TEMP_MARKER}{uuid.uuid4().hex[:8]}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files a killed :func:`atomic_write` left in ``folder`` (only those of the destination
    file ``names`` when given); returns what was removed. Writers call it before they start, so a run that was
    killed mid-write leaves no litter behind the next one."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None
    if names is not None:
        wanted = set()
        for name in names:
            suffix = image_suffix(name) or Path(name).suffix
            wanted.add((name[: len(name) - len(suffix)] if suffix else name, suffix))
    removed = []
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if not match or not path.is_file() or (wanted is not None and match.group(1, 2) not in wanted):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    if removed:
        logger.info(
            "removed %d stale temporary file(s) of an interrupted run: %s", len(removed), sorted(map(str, removed))
        )
    return removed


_TEMP_NAME = re.compile(r"^\.(.+)" + re.escape(TEMP_MARKER) + r"[0-9a-f]{8}(.*)$")


# ----------------------------------------------------------------------------------------------------------- reading
class LoadMedicalImage(Transform):
    """Load one image (or a list of same-sized masks, stacked as channels) as a channel-first MetaTensor.

    ITK reads volumes (with the DICOM tags), PIL reads 2D display images as ``[C, x, y]`` (as ``LoadImage`` does).
    Raises FileNotFoundError for a missing path, and ValueError naming the file for an unreadable
    file or an image that is not 2D or single-channel 3D (4D / time series are rejected).
    """

    def __init__(self, dtype=np.float32) -> None:
        from monai.data import ITKReader, PILReader

        common = {"image_only": True, "ensure_channel_first": True, "dtype": dtype}
        self.volume_loader = LoadImage(reader=ITKReader(series_meta=True), **common)
        self.display_loader = LoadImage(reader=PILReader(), **common)

    def __call__(self, filename: str | os.PathLike | Sequence[str | os.PathLike]):
        paths = [os.fspath(filename)] if isinstance(filename, (str, os.PathLike)) else [os.fspath(p) for p in filename]
        if not paths:
            raise ValueError("LoadMedicalImage: empty list of files")
        name = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)"
        for path in paths:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: no such file or directory")
        display = {is_display_file(p) for p in paths}
        if len(display) > 1:
            raise ValueError(f"{name}: cannot stack 2D display images with volumes")
        loader = self.display_loader if display.pop() else self.volume_loader
        try:
            img = loader(paths[0] if len(paths) == 1 else paths)
        except Exception as err:  # readers raise RuntimeError, OSError, ITK errors ...
            detail = (str(err).strip().splitlines() or [""])[0]
            problem = (
                "corrupt file or unsupported format" if len(paths) == 1 else "a file is unreadable or sizes differ"
            )
            raise ValueError(f"{name}: cannot be read as an image: {problem} ({type(err).__name__}: {detail})") from err
        spatial = img.ndim - 1
        if spatial not in (2, 3):
            raise ValueError(
                f"{name}: {spatial}D image of shape {tuple(img.shape[1:])}; expected a 2D image or a 3D volume "
                "(4D / time series are not supported: extract one volume first)"
            )
        max_channels = 4 if spatial == 2 else 1
        if len(paths) == 1 and img.shape[0] > max_channels:
            raise ValueError(
                f"{name}: {img.shape[0]} channels in a {spatial}D image of shape {tuple(img.shape)}; expected at "
                f"most {max_channels} (multi-channel or 4D volumes are not supported: extract one volume first)"
            )
        return img


class LoadMedicalImaged(MapTransform):
    """Dictionary version of `LoadMedicalImage`; a key may hold one path or a list of mask paths."""

    def __init__(self, keys: KeysCollection, dtype=np.float32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadMedicalImage(dtype=dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


def load_image(path: str | os.PathLike):
    """Load ``path`` channel-first: nibabel for NIfTI (its affine kept exactly), :class:`LoadMedicalImage` (ITK for
    NRRD / MHA / DICOM files and series folders, PIL for PNG/JPG) otherwise."""
    from monai.data import NibabelReader

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.lower().endswith(NIFTI_SUFFIXES):
        try:
            return LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)(path)
        except Exception as error:
            raise ValueError(f"{path}: cannot be read as a NIfTI image ({type(error).__name__}: {error})") from error
    return LoadMedicalImage()(path)


# ----------------------------------------------------------------------------------------------------------- writing
class ReferenceGeometry:
    """The voxel grid of a volume file (size, origin, spacing, direction), read once from its header with ITK.

    Writing a label with it (ITK index order = the voxel order :func:`load_image` gives, for NIfTI through nibabel
    and for ITK formats) copies the input's geometry and is several times faster than MONAI's writers for large
    volumes, which matters where every interactive click returns the whole label volume.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import itk

        reader = itk.ImageFileReader[itk.Image[itk.F, 3]].New(FileName=os.fspath(path))
        reader.UpdateOutputInformation()
        info = reader.GetOutput()
        # plain copies: ITK's point / vector / matrix objects refer into the reader's output
        self.size = tuple(int(v) for v in itk.size(info))
        self.origin = [float(v) for v in info.GetOrigin()]
        self.spacing = [float(v) for v in info.GetSpacing()]
        self.direction = np.array(itk.array_from_matrix(info.GetDirection()), dtype=np.float64)

    def write(self, mask: np.ndarray, path: str | os.PathLike, compress: bool = False) -> Path:
        """Write ``mask [X, Y, Z]`` (bool, or a uint8 / uint16 label map, see :func:`mask_data`) to ``path``
        atomically. ``compress``: zlib inside an NRRD / MHA file (a label volume shrinks some 1000x, which is most of
        an interactive answer's transfer time); NIfTI's compression follows its suffix (``.nii.gz``)."""
        import itk

        if tuple(mask.shape) != self.size:
            raise ValueError(f"mask of size {mask.shape} for an image of size {self.size}")
        image = itk.image_from_array(np.ascontiguousarray(mask_data(mask).transpose(2, 1, 0)))
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(itk.matrix_from_array(self.direction))
        path = Path(path)
        with atomic_write(path) as tmp:
            itk.imwrite(image, str(tmp), compression=compress or path.name.lower().endswith(".gz"))
        return path


def mask_data(mask: np.ndarray) -> np.ndarray:
    """The array a mask is written as: a bool mask as uint8 0/1, a label map as uint8 (labels up to 255) or uint16."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer) or (mask.size and (mask.min() < 0 or mask.max() > 65535)):
        raise ValueError(f"a label map must hold integer labels in [0, 65535], got dtype {mask.dtype}")
    if mask.dtype in (np.uint8, np.uint16):
        return mask
    return mask.astype(np.uint8 if not mask.size or mask.max() <= 255 else np.uint16)


def write_run_record(path: str | os.PathLike, script: str, argv: Sequence[str], device: str = "", **fields) -> None:
    """Write a script's JSON record atomically: its command line, the UTC date, the machine, then ``fields``."""
    import datetime
    import json
    import platform

    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads" + (f", {device}" if device else "")
    record = {
        "command": f"python {script} " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": machine,
        **fields,
    }
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def atomic_writer(output_ext: str) -> type:
    """MONAI's first ``ImageWriter`` for ``output_ext`` (``".nii.gz"``, ``".nrrd"``, ``".png"``, ...) for
    ``SaveImaged(writer=...)``, writing through :func:`atomic_write` so a failed write leaves no truncated file under
    the output's name (MONAI's writers write to the final name directly).

    With ``resample=False`` it writes the array on its own affine as it is: MONAI 1.6's writers still run a
    ``SpatialResample`` there, which fails on 2D arrays once their channel is squeezed."""
    from monai.data.image_writer import resolve_writer

    base = resolve_writer(output_ext)[0]

    def write(self, filename, *args, **kwargs):
        with atomic_write(filename) as tmp:
            base.write(self, os.fspath(tmp), *args, **kwargs)

    def resample_if_needed(cls, data_array, affine=None, target_affine=None, output_spatial_shape=None, **kwargs):
        if target_affine is None and output_spatial_shape is None:
            return data_array, affine
        return base.resample_if_needed.__func__(cls, data_array, affine, target_affine, output_spatial_shape, **kwargs)

    return type(
        f"Atomic{base.__name__}",
        (base,),
        {"write": write, "resample_if_needed": classmethod(resample_if_needed), "__module__": __name__},
    )


def write_mask(mask: np.ndarray, image, path: str | os.PathLike, display: bool = False, compress: bool = False) -> Path:
    """Write ``mask`` (the spatial shape of ``image``) with ``image``'s geometry to ``path`` atomically.

    ``mask`` is a bool mask (written 0/1 uint8) or an integer label map (uint8, or uint16 when its dtype is wider
    than 8 bits: the caller chooses from its largest label). ``image`` is the MetaTensor the mask belongs to (MONAI's
    nibabel / ITK writers copy its affine) or a :class:`ReferenceGeometry` of its file (the fast ITK path). A 2D mask
    is ``[x, y]`` like its image; PNG masks are written upright: a bool mask 0/255 (visible), a label map its label
    values (8 or 16 bit). ``display``: a 2D display image written as NIfTI (its ``[x, y]`` pixel grid, identity
    affine). ``compress``: zlib inside NRRD / MHA files (NIfTI's follows its suffix, PNG is always compressed).
    """
    path = Path(path)
    if isinstance(image, ReferenceGeometry):
        return image.write(mask, path, compress=compress)
    from monai.data import ITKWriter, NibabelWriter

    suffix = image_suffix(path.name) or path.suffix
    data = mask_data(mask)
    with atomic_write(path) as tmp:
        if suffix in DISPLAY_SUFFIXES:
            from PIL import Image

            picture = data * 255 if mask.dtype == bool else data
            Image.fromarray(np.ascontiguousarray(picture.T)).save(tmp)  # PIL takes [rows, columns] = [y, x]
        elif display:
            import nibabel as nib

            nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp))
        else:
            writer = (
                NibabelWriter(output_dtype=data.dtype)
                if suffix in NIFTI_SUFFIXES
                else ITKWriter(output_dtype=data.dtype)
            )
            # keep a trailing singleton spatial dim (a single-slice volume) so the data matches its 3D affine
            keep = data.shape[-1] == 1
            writer.set_data_array(torch.as_tensor(data)[None], channel_dim=0, squeeze_end_dims=not keep)
            if keep:
                writer.data_obj = writer.data_obj[..., 0]  # drop the channel axis moved to the end
            writer.set_metadata(dict(image.meta), resample=False)
            writer.write(str(tmp), verbose=False, **({} if suffix in NIFTI_SUFFIXES else {"compression": compress}))
    return path
