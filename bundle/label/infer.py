"""The MONAI Label infer task: clicks and boxes on a volume, one cached embedding per (image, axis, slice).

:class:`SAMUNetInferTask` is a ``BasicInferTask`` whose ``__call__`` replaces MONAI Label's transform/inferer chain
(which calls ``inferer(inputs, network)`` without prompts) by the bundle's prompted slice inferer:

1. the network and the inferer are those of ``configs/inference.json`` (``network_def``, ``inferer``), with the
   app's ``--conf`` values as overrides, so the server segments exactly as ``python -m monai.bundle run`` does;
2. the image is loaded and normalised for its modality as the CLI does it (:func:`bundle.inferers.normalized_volume`)
   and kept in a memory-bounded LRU cache keyed by its path, size and modification time (a click does not re-read
   the file);
3. the request's ``foreground`` / ``background`` clicks, ``roi`` boxes, ``slice``, ``mode``, ``label`` and
   ``objects``, and an uploaded ``label`` file (a mask prompt), are validated and planned
   (:mod:`bundle.label.requests`); anything wrong is a :class:`RequestError` (HTTP 4xx);
4. the inferer segments every object of the request together (:meth:`PromptedSliceInferer.segment_objects`); its
   embedding cache keeps every encoded slice, so a further click on an encoded slice only runs the prompt encoder
   and mask decoder; each object's interaction session (:class:`bundle.inferers.SessionStore`, keyed by image and
   object label, bounded in bytes, expiring) keeps its last masks and low-res logits per slice, so a correction
   refines the mask on screen and only the new clicks are decoded. A request whose boxes for an object differ from
   the session's (a new box) starts it afresh; ``reset_state`` (true) drops every session of the image first;
5. the answer (a 0/1 mask for one label, a label map of the configured labels for ``objects`` or a label upload) is
   written with the image's geometry (:func:`bundle.io.write_mask`, the fast ITK path) to a temporary file that
   MONAI Label sends back and deletes; ``label_names`` in the JSON part names its values. NRRD / MHA answers are
   zlib-compressed unless the request says ``result_compress: false`` (MONAI Label's own key; its writer's default
   is off, ours is on: a 512 x 512 x 48 answer is 12.6 MB raw and some 13 kB compressed, written as fast). Nothing
   in the datastore is written.

Weights: the config's ``weights`` (default LiteMedSAM) until the app's train task publishes a checkpoint
(``<app>/model/<name>.pt``); before every request the task checks that file, and when it changes it rebuilds the
network from it (its model contract says which network it is) with a fresh embedding cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from bundle.config import BUNDLE_ROOT, bundle_parser
from bundle.inferers import (
    InteractionSession,
    MemoryCache,
    PromptedSliceInferer,
    SessionStore,
    load_mask_prompt,
    normalized_volume,
    to_slices,
)
from bundle.io import LABEL_SUFFIXES, VOLUME_SUFFIXES, ReferenceGeometry, load_image, write_mask

from .requests import DEFAULT_LABELS, RequestError, RequestLimits, check_label_names, parse_request

logger = logging.getLogger(__name__)

INFERENCE_CONFIG = "configs/inference.json"


def file_digest(path: str | os.PathLike, length: int = 12) -> str:
    """Short SHA-256 of a file (names a weights version in responses)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def _volume_entry_bytes(entry) -> int:
    image, volume, *_ = entry
    return int(volume.nbytes) + int(image.numel() * image.element_size())


class SAMUNetInferTask(BasicInferTask):
    """Interactive SAM-UNet segmentation for MONAI Label (clicks, boxes, 2D or propagated 3D).

    Args:
        published_weights: the app's checkpoint file that the train task (re)writes; used when it exists.
        overrides: ``configs/inference.json`` ids to override (``weights``, ``network_def#...``, ``device``,
            ``batch_size``, ``cache_bytes``, ...), from the app's ``--conf``.
        bundle_root: the bundle whose ``configs/inference.json`` defines the network and the inferer.
        modality: force a modality (``"ct"``, ``"mr"``, ...) for every image; otherwise the request's ``modality``,
            the image metadata, then ``default_modality``.
        volume_cache_bytes: memory budget of the loaded-volume cache.
        default_mode: ``"2d"`` or ``"3d"`` when a request does not say.
        labels: the labels served, ``{name: value}`` with values 1..N (3D Slicer lists them as segments).
        allowed_roots: folders an infer request may read an image path from (the datastore and the server's own
            upload folder); other paths are refused with 403.
        limits: the most clicks per slice and boxes per request (:class:`RequestLimits`); more is refused with 413
            before the network is taken.
        session_bytes: memory budget of the interaction sessions (the least recently used go beyond it; 0: none
            kept, every request is replayed from its box).
        session_ttl_s: seconds after its last request when an object's session expires.
    """

    def __init__(
        self,
        published_weights: str | os.PathLike,
        overrides: dict | None = None,
        bundle_root: str | os.PathLike = BUNDLE_ROOT,
        modality: str | None = None,
        default_modality: str | None = "ct",
        volume_cache_bytes: int = 1 << 29,
        default_mode: str = "2d",
        labels: dict[str, int] | None = None,
        allowed_roots: list[str] | None = None,
        limits: RequestLimits | None = None,
        preload: bool = True,
        session_bytes: int = 256 << 20,
        session_ttl_s: float = 1800.0,
        description: str = "SAM-UNet interactive segmentation (clicks and boxes, cached slice embeddings)",
    ) -> None:
        labels = check_label_names(labels or DEFAULT_LABELS)
        super().__init__(
            path=None,
            network=None,
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=3,
            description=description,
            config={"mode": ["2d", "3d"], "result_extension": list(LABEL_SUFFIXES)},
        )
        self.published_weights = Path(published_weights)
        self.overrides = dict(overrides or {})
        self.bundle_root = Path(bundle_root)
        self.modality = modality
        self.default_modality = default_modality
        self.default_mode = default_mode
        self.volumes = MemoryCache(volume_cache_bytes, sizeof=_volume_entry_bytes)
        self.sessions = SessionStore(session_bytes, session_ttl_s)
        self.allowed_roots = [os.path.realpath(r) for r in (allowed_roots or [])]
        self.limits = limits or RequestLimits()
        self._lock = threading.RLock()
        self._inferer: PromptedSliceInferer | None = None
        self._weights_stamp: tuple | None = None
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

    def _current_source(self) -> tuple[dict, tuple]:
        """Config overrides for the weights to serve now, and a stamp that changes when they do."""
        if self.published_weights.is_file():
            st = self.published_weights.stat()
            return {"weights": str(self.published_weights)}, (str(self.published_weights), st.st_size, st.st_mtime_ns)
        return {}, ("initial", self.overrides.get("weights"))

    def ensure_network(self) -> PromptedSliceInferer:
        """Build ``inferer`` (and its network) from the inference config on first use; rebuild it from the published
        checkpoint when that file changed (the old inferer and its embedding cache are dropped)."""
        weights, stamp = self._current_source()
        with self._lock:
            if self._inferer is not None and stamp == self._weights_stamp:
                return self._inferer
            start = time.perf_counter()
            parser = bundle_parser(INFERENCE_CONFIG, self.bundle_root, {**self.overrides, **weights})
            parser.get_parsed_content("initialize")  # the config's CPU tuning (glibc malloc thresholds)
            inferer = parser.get_parsed_content("inferer")
            self._inferer = inferer
            self.sessions.reset()  # masks of the old weights
            self._weights_stamp = stamp
            self.generation += 1
            source = parser.get_parsed_content("weights")
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
        if self._inferer is not None:
            self._inferer.cache.clear()

    # -------------------------------------------------------------------------------------------------------- image
    def _check_path(self, path: str, what: str = "image") -> str:
        if not isinstance(path, str) or not path:
            raise RequestError("no image: give the id of an image in the datastore (or upload a file)", status=404)
        real = os.path.realpath(path)
        if not os.path.isfile(real):
            raise RequestError(f"{what} {path!r} not found", status=404)
        if self.allowed_roots and not any(real == r or real.startswith(r + os.sep) for r in self.allowed_roots):
            raise RequestError(f"{what} path {path!r} is outside the datastore; give an image id", status=403)
        if not real.lower().endswith(VOLUME_SUFFIXES):
            raise RequestError(
                f"{what} {os.path.basename(path)!r}: expected a volume file ({', '.join(VOLUME_SUFFIXES)})", status=415
            )
        return real

    def load_volume(self, path: str, modality: str | None):
        """``(image MetaTensor [1, X, Y, Z], volume [X, Y, Z] in [0, 255], modality, cache key, geometry)``."""
        from bundle.transforms.modality import check_intensities, resolve_modality

        real = self._check_path(path)
        st = os.stat(real)
        requested = self.modality or modality
        key = (real, st.st_size, st.st_mtime_ns, requested)
        cached = self.volumes.get(key)
        if cached is not None:
            image, volume, used, geometry = cached
            return image, volume, used, key, geometry
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
        name = os.path.basename(path)
        try:
            intensities = np.asarray(image)
            found = resolve_modality(
                image.meta, self.modality, modality, self.default_modality, source=name, intensities=intensities
            )
            check_intensities(intensities, found, source=name)
            used = found.value
            volume = to_slices(normalized_volume(image, used, source=name), axis=2)
        except ValueError as error:
            raise RequestError(str(error), status=422) from None
        try:
            geometry = ReferenceGeometry(real)
        except Exception as error:  # noqa: BLE001 - fall back to MONAI's writer
            logger.warning(
                "%s: header not readable with ITK (%s); results are written with MONAI's writer", real, error
            )
            geometry = None
        self.volumes.put(key, (image, np.ascontiguousarray(volume), used, geometry))
        return image, volume, used, key, geometry

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
        if extension is not None and extension not in LABEL_SUFFIXES:
            raise RequestError(f"result_extension must be one of {list(LABEL_SUFFIXES)}, got {extension!r}")
        mode = request.get("mode", self.default_mode)
        if isinstance(mode, list):
            mode = self.default_mode

        image, volume, used_modality, key, geometry = self.load_volume(image_path, modality)
        request, mask = self._label_upload(request, volume.shape)
        t_loaded = time.perf_counter()
        parsed = parse_request(
            {**request, "mode": mode}, volume.shape, self.default_mode, self.labels, mask, self.limits
        )
        reset = _flag(request, "reset_state", False)
        compress = _flag(request, "result_compress", True)

        with self._lock:  # one request at a time on the network (the cache and inferer state are shared)
            inferer = self.ensure_network()
            cache = inferer.cache
            hits0, misses0, encoded0 = cache.hits, cache.misses, inferer.stats["encoded"]
            image_id = (key, self.generation)
            if reset:
                self.sessions.reset(image_id)
            objects = object_keys(parsed.labels, parsed.label_names)
            sessions = [self._session(image_id, name, plan) for name, plan in zip(objects, parsed.plans)]
            decoded0 = inferer.stats["decoded"]
            labels, results = inferer.segment_objects(
                volume, parsed.plans, image_id=image_id, labels=parsed.labels, sessions=sessions
            )
            for name, session in zip(objects, sessions):
                self.sessions.put(image_id, name, session)
            decoded = inferer.stats["decoded"] - decoded0
            slices = [r.index for object_results in results for r in object_results]
            encoded = inferer.stats["encoded"] - encoded0
            hits, misses = cache.hits - hits0, cache.misses - misses0
            version = self.model_version
        t_infer = time.perf_counter()
        answer = labels if parsed.label_map else labels > 0

        if extension is None:
            lower = str(image_path).lower()
            extension = next((s for s in LABEL_SUFFIXES if lower.endswith(s)), ".nii.gz")
        out = Path(tempfile.gettempdir()) / f"sam_unet_{uuid.uuid4().hex}{extension}"
        if geometry is not None and geometry.size == tuple(image.shape[1:]):
            write_mask(answer, geometry, out, compress=compress)
        else:
            write_mask(answer.reshape(image.shape[1:]), image, out, compress=compress)
        t_written = time.perf_counter()
        result = {
            "label_names": parsed.label_names,
            "objects": [
                {"name": name, "label": value, "voxels": int(np.count_nonzero(labels == value))}
                for name, value in parsed.label_names.items()
                if not parsed.label_map or value in parsed.labels
            ],
            "model_version": version,
            "mode": parsed.mode,
            "modality": used_modality,
            "slice": parsed.slice_index,
            "slices": sorted(set(slices)),
            "voxels": int(np.count_nonzero(labels)),
            "encoded_slices": int(encoded),
            "decoded_slices": int(decoded),
            "sessions": {"objects": len(self.sessions), "mib": round(self.sessions.nbytes / 2**20, 2)},
            "cache": {
                "hits": int(hits),
                "misses": int(misses),
                "entries": len(cache),
                "mib": round(cache.nbytes / 2**20, 1),
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

    def _session(self, image_id, name, plan) -> InteractionSession:
        """The object's session, or a fresh one when its request's boxes differ from those it was started with."""
        boxes = tuple((k, seed.box) for k, seed in plan.seeds.items() if seed.box is not None)
        session = self.sessions.get(image_id, name)
        return session if session.boxes == boxes else InteractionSession(boxes)

    def _label_upload(self, request: dict, shape: tuple[int, ...]) -> tuple[dict, np.ndarray | None]:
        """An uploaded ``label`` file (MONAI Label puts its temporary path in ``request["label"]``) as a label map of
        the image's size, and the request without it; a ``label`` that is not a file is a label name."""
        label = request.get("label")
        if not isinstance(label, str) or not label.lower().endswith(LABEL_SUFFIXES) or not os.path.isfile(label):
            return request, None
        path = self._check_path(label, what="label")
        try:
            mask = load_mask_prompt(path, shape)
        except ValueError as error:
            raise RequestError(str(error).replace(path, "label upload"), status=422) from None
        return {k: v for k, v in request.items() if k != "label"}, mask

    # BasicInferTask's abstract chain is replaced by __call__
    def pre_transforms(self, data=None):
        return []

    def post_transforms(self, data=None):
        return []


def _flag(request: dict, key: str, default: bool) -> bool:
    """A true / false request option (JSON booleans, 0 / 1 or the strings 3D Slicer's option panel sends)."""
    value = request.get(key, default)
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if value in ("true", "false"):
        return value == "true"
    raise RequestError(f"{key} must be true or false, got {value!r}")


def object_keys(values: list[int], label_names: dict[str, int]) -> list[tuple[str, int]]:
    """The session key of each object of a request: its label's name and its rank among the request's objects of
    that label (several boxes of one label are several objects)."""
    names = {value: name for name, value in label_names.items()}
    seen: dict[int, int] = {}
    keys = []
    for value in values:
        keys.append((names.get(value, str(value)), seen.get(value, 0)))
        seen[value] = seen.get(value, 0) + 1
    return keys
