"""The MONAI Label infer task: clicks and boxes on a volume, one cached embedding per (image, axis, slice).

:class:`SAMUNetInferTask` is a ``BasicInferTask`` whose ``__call__`` replaces MONAI Label's transform/inferer chain
(which calls ``inferer(inputs, network)`` without prompts) by the bundle's prompted slice inferer:

1. the image is loaded once and kept, normalised, in a small memory-bounded LRU cache keyed by its path, size and
   modification time (a click does not re-read the file);
2. the request's ``foreground`` / ``background`` clicks, ``roi`` boxes, ``slice`` and ``mode`` are validated and
   planned (:mod:`bundle.label.requests`); anything wrong is a :class:`RequestError` (HTTP 4xx);
3. :class:`bundle.inferers.PromptedSliceInferer` segments the planned slices; its :class:`EmbeddingCache` keeps the
   image embedding of every encoded slice under ``(image key, axis, slice)``, so a further click on an encoded slice
   only runs the prompt encoder and mask decoder;
4. the mask is written with the image's geometry (:func:`bundle.inferers.write_mask`) to a temporary file that
   MONAI Label sends back and deletes. Nothing in the datastore is written.

Weights: the task loads ``weights`` (default LiteMedSAM) and then, before every request, checks the app's published
checkpoint (``<app>/model/<name>.pt``, written by the train task); when that file changes the weights are reloaded
and the embedding cache is cleared, so the next inference uses the new weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from bundle.inferers import EmbeddingCache, PromptedSliceInferer, load_image, write_mask

from .requests import RequestError, parse_request

logger = logging.getLogger(__name__)

LITEMEDSAM_NETWORK = {"backbone": "tiny_vit", "conv_branch": "none", "fusion": False, "decoder_tokens": "sam"}
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def file_digest(path: str | os.PathLike, length: int = 12) -> str:
    """Short SHA-256 of a file (names a weights version in responses)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


class VolumeCache:
    """LRU of loaded, normalised volumes keyed by (path, size, mtime, modality), bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, tuple[Any, np.ndarray, int]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[:2]

    def put(self, key, image, volume: np.ndarray) -> None:
        size = int(volume.nbytes) + int(getattr(image, "nbytes", 0) or image.numel() * image.element_size())
        with self._lock:
            if key in self._entries:
                self._nbytes -= self._entries.pop(key)[2]
            if size > self.max_bytes:
                return
            self._entries[key] = (image, volume, size)
            self._nbytes += size
            while self._nbytes > self.max_bytes and self._entries:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self._nbytes -= dropped


class ReferenceGeometry:
    """The voxel grid of an image file (size, origin, spacing, direction) read once from its header with ITK.

    Writing a label with it (ITK index order = the voxel order ``load_image`` gives, for NIfTI through nibabel and
    for ITK formats) copies the input's geometry exactly and is several times faster than MONAI's writers for large
    volumes, which matters when every click returns the whole label volume.
    """

    def __init__(self, path: str) -> None:
        import itk

        reader = itk.ImageFileReader[itk.Image[itk.F, 3]].New(FileName=str(path))
        reader.UpdateOutputInformation()
        info = reader.GetOutput()
        # plain copies: ITK's point / vector / matrix objects refer into the reader's output
        self.size = tuple(int(v) for v in itk.size(info))
        self.origin = [float(v) for v in info.GetOrigin()]
        self.spacing = [float(v) for v in info.GetSpacing()]
        self.direction = np.array(itk.array_from_matrix(info.GetDirection()), dtype=np.float64)

    def write(self, mask: np.ndarray, path: Path) -> Path:
        """Write ``mask [X, Y, Z]`` (bool) as uint8 0/1 to ``path`` (temporary name, then an atomic rename)."""
        import itk

        if tuple(mask.shape) != self.size:
            raise ValueError(f"mask of size {mask.shape} for an image of size {self.size}")
        image = itk.image_from_array(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8, copy=False))
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(itk.matrix_from_array(self.direction))
        suffix = next((s for s in RESULT_EXTENSIONS if path.name.endswith(s)), path.suffix)
        tmp = path.with_name(f".{path.name[: -len(suffix)]}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
        try:
            itk.imwrite(image, str(tmp), compression=suffix.endswith(".gz"))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path


class SAMUNetInferTask(BasicInferTask):
    """Interactive SAM-UNet segmentation for MONAI Label (clicks, boxes, 2D or propagated 3D).

    Args:
        published_weights: the app's checkpoint file that the train task (re)writes; used when it exists.
        weights: initial weights (a file or ``"litemedsam"``) when ``published_weights`` does not exist yet.
        network: ``SAMUNet`` keyword arguments (default: the LiteMedSAM configuration).
        pixel_normalization: ``"litemedsam"`` or ``"sam"`` (default: ``"litemedsam"`` for the ``tiny_vit`` backbone).
        modality: force a modality (``"ct"``, ``"mr"``, ...) for every image; otherwise the request's ``modality``,
            the image metadata, then ``default_modality``.
        cache_bytes: memory budget of the embedding cache; volume_cache_bytes: of the loaded-volume cache.
        default_mode: ``"2d"`` or ``"3d"`` when a request does not say.
        allowed_roots: folders an infer request may read an image path from (the datastore and the upload temp
            folder); other paths are refused with 403.
    """

    def __init__(
        self,
        published_weights: str | os.PathLike,
        weights: str | None = "litemedsam",
        network: dict | None = None,
        pixel_normalization: str | None = None,
        modality: str | None = None,
        default_modality: str | None = "ct",
        cache_bytes: int = 1 << 30,
        volume_cache_bytes: int = 1 << 29,
        default_mode: str = "2d",
        batch_size: int = 4,
        device: str | None = None,
        label_name: str = "lesion",
        allowed_roots: list[str] | None = None,
        preload: bool = True,
        description: str = "SAM-UNet interactive segmentation (clicks and boxes, cached slice embeddings)",
    ) -> None:
        super().__init__(
            path=None,
            network=None,
            type=InferType.DEEPGROW,
            labels={label_name: 1},
            dimension=3,
            description=description,
            config={"mode": ["2d", "3d"], "result_extension": list(RESULT_EXTENSIONS)},
        )
        self.published_weights = Path(published_weights)
        self.initial_weights = weights
        self.network_kwargs = dict(LITEMEDSAM_NETWORK if network is None else network)
        backbone = self.network_kwargs.get("backbone", "vit_b")
        self.pixel_normalization = pixel_normalization or ("litemedsam" if backbone == "tiny_vit" else "sam")
        self.modality = modality
        self.default_modality = default_modality
        self.default_mode = default_mode
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cache = EmbeddingCache(max_bytes=cache_bytes)
        self.volumes = VolumeCache(volume_cache_bytes)
        self.allowed_roots = [os.path.realpath(r) for r in (allowed_roots or [])]
        self._lock = threading.RLock()
        self._inferer: PromptedSliceInferer | None = None
        self._weights_stamp: tuple | None = None
        self._geometry: dict[tuple, ReferenceGeometry] = {}
        self.model_version = "unloaded"
        self.generation = 0
        if preload:
            self.ensure_network()

    # ------------------------------------------------------------------------------------------------------ network
    def is_valid(self) -> bool:
        return True

    def get_path(self, validate=True):
        """The published checkpoint (MONAI Label's /model endpoint serves it) once training has written one."""
        path = str(self.published_weights)
        return path if (not validate or os.path.exists(path)) else None

    def _current_source(self) -> tuple[str | None, tuple | None]:
        if self.published_weights.is_file():
            st = self.published_weights.stat()
            return str(self.published_weights), (str(self.published_weights), st.st_size, st.st_mtime_ns)
        return self.initial_weights, ("initial", self.initial_weights)

    def ensure_network(self) -> PromptedSliceInferer:
        """Build the network on first use; reload the weights (and clear the cache) when the published file changed."""
        source, stamp = self._current_source()
        with self._lock:
            if self._inferer is not None and stamp == self._weights_stamp:
                return self._inferer
            from bundle.networks import SAMUNet
            from bundle.networks.cpu import tune_malloc

            if self.device.type == "cpu":
                tune_malloc()  # TinyViT's large activations: 1.9x faster encoding, same results (docs/benchmarks.md)
            start = time.perf_counter()
            network = SAMUNet(**self.network_kwargs, weights=source)
            inferer = PromptedSliceInferer(
                network,
                pixel_normalization=self.pixel_normalization,
                batch_size=self.batch_size,
                cache=self.cache,
                device=self.device,
            )
            self.cache.clear()
            self._inferer = inferer
            self._weights_stamp = stamp
            self.generation += 1
            if source and os.path.isfile(str(source)):
                self.model_version = f"{Path(source).name}:{file_digest(source)}"
            else:
                self.model_version = str(source)
            logger.info(
                "SAM-UNet weights %s loaded in %.1f s (generation %d)",
                self.model_version,
                time.perf_counter() - start,
                self.generation,
            )
            return inferer

    def clear_cache(self):
        self.cache.clear()

    # -------------------------------------------------------------------------------------------------------- image
    def _check_path(self, path: str) -> str:
        if not isinstance(path, str) or not path:
            raise RequestError("no image: give the id of an image in the datastore (or upload a file)", status=404)
        real = os.path.realpath(path)
        if not os.path.isfile(real):
            raise RequestError(f"image {path!r} not found", status=404)
        if self.allowed_roots and not any(real == r or real.startswith(r + os.sep) for r in self.allowed_roots):
            raise RequestError(f"image path {path!r} is outside the datastore; give an image id", status=403)
        if not real.lower().endswith(VOLUME_SUFFIXES):
            raise RequestError(
                f"image {os.path.basename(path)!r}: expected a volume file ({', '.join(VOLUME_SUFFIXES)})", status=415
            )
        return real

    def load_volume(self, path: str, modality: str | None):
        """``(image MetaTensor [1, X, Y, Z], normalised volume [X, Y, Z] in [0, 1], modality, cache key)``."""
        from bundle.transforms import ModalityNormalize

        real = self._check_path(path)
        st = os.stat(real)
        requested = self.modality or modality
        key = (real, st.st_size, st.st_mtime_ns, requested)
        cached = self.volumes.get(key)
        if cached is not None:
            image, volume = cached
            return image, volume, image.meta.get("modality", requested), key
        try:
            image = load_image(real)
        except (ValueError, OSError) as error:
            raise RequestError(f"image {os.path.basename(path)!r} cannot be read: {error}", status=415) from None
        spatial = tuple(image.shape[1:])
        if image.shape[0] != 1 or len(spatial) != 3:
            raise RequestError(
                f"image {os.path.basename(path)!r} has shape {tuple(image.shape)}; expected a single-channel 3D volume",
                status=422,
            )
        try:
            normalizer = ModalityNormalize(modality=requested, default_modality=self.default_modality, out_channels=1)
            normalized = normalizer(image, source=os.path.basename(path))
        except ValueError as error:
            raise RequestError(str(error), status=422) from None
        volume = np.ascontiguousarray(normalized[0].cpu().numpy().astype(np.float32) / 255.0)
        used = str(normalized.meta.get("modality", requested)) if hasattr(normalized, "meta") else str(requested)
        image.meta["modality"] = used
        try:
            self._geometry[key] = ReferenceGeometry(real)
            while len(self._geometry) > 64:
                self._geometry.pop(next(iter(self._geometry)))
        except Exception as error:  # noqa: BLE001 - fall back to MONAI's writer below
            logger.warning(
                "%s: header not readable with ITK (%s); results are written with MONAI's writer", real, error
            )
        self.volumes.put(key, image, volume)
        return image, volume, used, key

    # ---------------------------------------------------------------------------------------------------------- run
    def __call__(self, request, callbacks=None):
        begin = time.perf_counter()
        begin_cpu = time.thread_time()
        image_path = request.get("image")
        modality = request.get("modality")
        if modality is not None and not isinstance(modality, str):
            raise RequestError(f"modality must be a string such as 'ct' or 'mr', got {modality!r}")
        extension = request.get("result_extension") or None
        if isinstance(extension, list):  # MONAI Label may pass the whole option list from config()
            extension = None
        if extension is not None and extension not in RESULT_EXTENSIONS:
            raise RequestError(f"result_extension must be one of {list(RESULT_EXTENSIONS)}, got {extension!r}")
        mode = request.get("mode", self.default_mode)
        if isinstance(mode, list):
            mode = self.default_mode

        image, volume, used_modality, key = self.load_volume(image_path, modality)
        t_loaded = time.perf_counter()
        parsed = parse_request({**request, "mode": mode}, volume.shape, self.default_mode)

        with self._lock:  # one request at a time on the network (the cache and inferer state are shared)
            inferer = self.ensure_network()
            hits0, misses0, encoded0 = self.cache.hits, self.cache.misses, inferer.stats["encoded"]
            inferer.transpose = True
            image_id = (key, self.generation)
            mask = np.zeros(volume.shape, dtype=bool)
            slices: list[int] = []
            for plan in parsed.plans:
                if plan.propagate or len(plan.seeds) > 1:
                    part, results = inferer.segment_volume(volume, plan, image_id=image_id)
                    mask |= part
                    slices += [r.index for r in results]
                else:
                    ((k, prompt),) = plan.seeds.items()
                    mask[..., k] |= inferer.segment_slice(volume, k, prompt, image_id=image_id, axis=plan.axis)
                    slices.append(k)
            encoded = inferer.stats["encoded"] - encoded0
            hits, misses = self.cache.hits - hits0, self.cache.misses - misses0
            version = self.model_version
        t_infer = time.perf_counter()

        if extension is None:
            lower = str(image_path).lower()
            extension = next((s for s in RESULT_EXTENSIONS if lower.endswith(s)), ".nii.gz")
        out = Path(tempfile.gettempdir()) / f"sam_unet_{uuid.uuid4().hex}{extension}"
        geometry = self._geometry.get(key)
        if geometry is not None and geometry.size == tuple(image.shape[1:]):
            geometry.write(mask, out)
        else:
            write_mask(mask.reshape(image.shape[1:]), image, out)
        t_written = time.perf_counter()
        result = {
            "label_names": self.labels,
            "model_version": version,
            "mode": parsed.mode,
            "modality": used_modality,
            "slice": parsed.slice_index,
            "slices": sorted(set(slices)),
            "voxels": int(mask.sum()),
            "encoded_slices": int(encoded),
            "cache": {
                "hits": int(hits),
                "misses": int(misses),
                "entries": len(self.cache),
                "mib": round(self.cache.nbytes / 2**20, 1),
            },
            "latencies": {
                "pre": round(t_loaded - begin, 4),
                "infer": round(t_infer - t_loaded, 4),
                "invert": 0,
                "post": 0,
                "write": round(t_written - t_infer, 4),
                "total": round(t_written - begin, 4),
                "transform": None,
            },
            # CPU time of the serving thread (with threads=1 the whole request; independent of other load)
            "cpu_s": round(time.thread_time() - begin_cpu, 4),
        }
        logger.info(
            "SAM-UNet %s: %d voxels on slices %s; encoded %d slice(s), cache hits %d; %.3f s",
            parsed.mode,
            result["voxels"],
            result["slices"],
            encoded,
            hits,
            t_written - begin,
        )
        return str(out), result

    # BasicInferTask's abstract chain is replaced by __call__
    def pre_transforms(self, data=None):
        return []

    def post_transforms(self, data=None):
        return []
