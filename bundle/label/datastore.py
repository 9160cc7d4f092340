"""A MONAI Label local datastore that stays inside its folder and refuses uploads that are not images or label maps.

MONAI Label's ``LocalDatastore`` joins image ids and label tags straight into file paths (``<studies>/<id><ext>``,
``<studies>/labels/<tag>/<id><ext>``), so an id such as ``../../x`` writes, reads or deletes outside the studies
folder, and an upload under an existing id replaces that study's volume while keeping its labels.
:class:`CheckedLocalDatastore` checks every id and tag (:func:`check_name`), refuses to replace an image unless the
upload asks for it, and never hands out a path outside its folders.
"""

from __future__ import annotations

import filecmp
import logging
import os

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from bundle.io import LABEL_SUFFIXES

logger = logging.getLogger(__name__)

#: the ``params`` key of an upload that allows it to replace an image already in the datastore
OVERWRITE_KEY = "overwrite"
MAX_NAME_LENGTH = 200


class UploadError(HTTPException, ValueError):
    """An upload that is refused: an HTTP 4xx answer (``status``) whose detail is ``message``."""

    def __init__(self, message: str, status: int = 415) -> None:
        super().__init__(status_code=status, detail=message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


def name_problem(value) -> str | None:
    """Why ``value`` is not a safe datastore name (one path component), or ``None`` when it is."""
    if not isinstance(value, str) or not value:
        return "it is empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"it is longer than {MAX_NAME_LENGTH} characters"
    if any(sep in value for sep in ("/", "\\", os.sep, os.altsep) if sep):
        return "it contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "it contains control characters"
    if set(value) == {"."}:
        return "it is made of dots only"
    return None


def check_name(value, what: str) -> str:
    """``value`` if it is one file-name component (no separators, no control characters, not dots only), else an
    :class:`UploadError` (400) naming ``what`` (``"image id"``, ``"label tag"``, ...)."""
    problem = name_problem(value)
    if problem:
        raise UploadError(
            f"{what} {value!r} is not a valid name: {problem}; expected one file name without path parts", status=400
        )
    return value


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
    """``LocalDatastore`` that keeps every file inside its folder and validates what enters it.

    - image ids and label tags must be single names (:func:`check_name`, HTTP 400), on upload, save and delete;
      an entry of ``datastore_v2.json`` whose id or tag is not (written by an older server) is never resolved to a
      path;
    - an upload under an id that exists is refused (409) unless its content is identical (nothing changes) or its
      ``params`` hold ``{"overwrite": true}``, which replaces the image and removes its labels (they were drawn on
      the old volume);
    - a file that cannot be read as a 3D volume, or a label whose size differs from its image, is refused (415 /
      422) and nothing is written.
    """

    # ------------------------------------------------------------------------------------------------------ paths
    def get_image_uri(self, image_id: str) -> str:
        if name_problem(image_id):
            return ""
        return super().get_image_uri(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        if name_problem(label_id) or name_problem(label_tag):
            return ""
        return super().get_label_uri(label_id, label_tag)

    def get_image_info(self, image_id: str):
        return super().get_image_info(image_id) if not name_problem(image_id) else {}

    def datalist(self, full_path=True):
        # unsafe ids / tags of an old datastore file never reach training
        return [d for d in super().datalist(full_path) if all(self._inside(p) for p in d.values())]

    def _inside(self, path: str) -> bool:
        root = os.path.realpath(self._datastore_path)
        return os.path.commonpath([root, os.path.realpath(path)]) == root

    # ---------------------------------------------------------------------------------------------------- changes
    def add_image(self, image_id, image_filename, image_info):
        info = dict(image_info or {})
        overwrite = info.pop(OVERWRITE_KEY, False) is True
        if not image_id:  # MONAI Label's own default: the upload's file name
            image_id, _ = self._to_id(os.path.basename(image_filename))
        check_name(image_id, "image id")
        # the endpoint stores the upload under a temporary name with the client's suffixes
        check_volume_file(image_filename, "image", name=image_id + _suffix(image_filename))
        existing = self._datastore.objects.get(image_id)
        if existing is not None:
            current = self.get_image_uri(image_id)
            if os.path.isfile(current) and filecmp.cmp(current, image_filename, shallow=False):
                logger.info("image %r uploaded again with identical content; nothing changed", image_id)
                return image_id
            if not overwrite:
                labels = sorted(existing.labels)
                raise UploadError(
                    f"image {image_id!r} is already in the datastore"
                    + (f" with labels {labels}" if labels else "")
                    + f"; upload it under another id, or pass params {{{OVERWRITE_KEY!r}: true}} to replace it "
                    "(its labels are removed)",
                    status=409,
                )
            logger.warning("image %r replaced on request; its labels %s are removed", image_id, sorted(existing.labels))
            super().remove_image(image_id)
        return super().add_image(image_id, image_filename, info)

    def remove_image(self, image_id: str) -> None:
        check_name(image_id, "image id")
        if image_id not in self._datastore.objects:
            raise UploadError(f"image {image_id!r} is not in the datastore", status=404)
        return super().remove_image(image_id)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        check_name(image_id, "image id")
        check_name(label_tag, "label tag")
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

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_name(label_id, "image id")
        check_name(label_tag, "label tag")
        if not self.get_label_uri(label_id, label_tag):
            raise UploadError(f"no label with tag {label_tag!r} for image {label_id!r}", status=404)
        return super().remove_label(label_id, label_tag)


def _suffix(path: str) -> str:
    lower = path.lower()
    for suffix in LABEL_SUFFIXES:
        if lower.endswith(suffix):
            return path[-len(suffix) :]
    return os.path.splitext(path)[1]
