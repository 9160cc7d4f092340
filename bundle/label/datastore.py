"""A MONAI Label local datastore that refuses uploads that are not readable images or label maps."""

from __future__ import annotations

import logging
import os

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from bundle.io import LABEL_SUFFIXES

logger = logging.getLogger(__name__)


class UploadError(HTTPException, ValueError):
    """An upload that is refused: an HTTP 4xx answer (``status``) whose detail is ``message``."""

    def __init__(self, message: str, status: int = 415) -> None:
        super().__init__(status_code=status, detail=message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_volume_file(path: str, what: str = "image", name: str | None = None) -> tuple[int, ...]:
    """Read the header (and data) of ``path`` with ITK / nibabel; returns the voxel size or raises UploadError."""
    shown = name or os.path.basename(path)
    lower = (name or path).lower()
    if not lower.endswith(LABEL_SUFFIXES):
        raise UploadError(f"{what} {shown!r}: unsupported file type; expected one of {', '.join(LABEL_SUFFIXES)}")
    try:
        from bundle.io import load_image

        image = load_image(path)
    except Exception as error:  # readers raise many types; the message names the file
        detail = (str(error).strip().splitlines() or [""])[0].replace(f"{path}: ", "").replace(str(path), shown)
        raise UploadError(f"{what} {shown!r} is not a readable {', '.join(LABEL_SUFFIXES)} file ({detail})") from None
    spatial = tuple(int(s) for s in image.shape[1:])
    if image.shape[0] != 1 or len(spatial) != 3:
        raise UploadError(
            f"{what} {shown!r} has shape {tuple(image.shape)}; expected a single-channel 3D volume", status=422
        )
    return spatial


class CheckedLocalDatastore(LocalDatastore):
    """``LocalDatastore`` that validates uploaded images and saved labels before they enter the datastore.

    A file that cannot be read as a 3D volume (or a label whose size differs from its image) is refused with an
    :class:`UploadError`; the app turns it into an HTTP 4xx answer and nothing is written.
    """

    def add_image(self, image_id, image_filename, image_info):
        # the endpoint stores the upload under a temporary name with the client's suffixes
        check_volume_file(image_filename, "image", name=(image_id or "") + _suffix(image_filename))
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise UploadError(f"image {image_id!r} is not in the datastore", status=404)
        label_size = check_volume_file(label_filename, "label", name=f"{image_id} label{_suffix(label_filename)}")
        image_size = check_volume_file(self.get_image_uri(image_id), "image")
        if label_size != image_size:
            raise UploadError(
                f"label for {image_id!r} has size {list(label_size)}; its image has {list(image_size)}", status=422
            )
        return super().save_label(image_id, label_filename, label_tag, label_info)


def _suffix(path: str) -> str:
    lower = path.lower()
    for suffix in LABEL_SUFFIXES:
        if lower.endswith(suffix):
            return path[-len(suffix) :]
    return os.path.splitext(path)[1]
