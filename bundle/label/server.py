"""The SAM-UNet MONAI Label app (``bundle/label/app/main.py`` exposes it to ``monailabel start_server``).

Configuration (``--conf key value``; all optional):

=====================  =================================================================================================
``models``             infer/train task names to enable, comma separated; only ``sam_unet`` exists (default).
``weights``            initial weights: a checkpoint file or ``litemedsam`` (default: ``weights`` of inference.json);
                       a bundle checkpoint brings its own network (its model contract).
``network``            JSON of ``SAMUNet`` arguments that override ``network_def`` of ``configs/inference.json``.
``modality``           force one modality for every image (``ct``, ``mr``, ...); else request / metadata / default.
``default_modality``   modality of images that name none (default ``ct``).
``mode``               default request mode, ``2d`` or ``3d`` (default ``2d``).
``labels``             the labels served, JSON ``{"name": value}`` with values 1..N (default ``{"lesion": 1}``).
``cache_mb``           embedding cache budget in MiB (default 1024); ``volume_cache_mb`` loaded volumes (512).
``session_mb``         interaction sessions (each object's last masks, for corrections) in MiB (default 256).
``session_ttl_s``      seconds after its last request when an object's session expires (default 1800).
``device``             ``cpu``, ``cuda``, ``cuda:1`` (default: CUDA when available).
``model_dir``          where trained weights are published (default ``<app>/model``).
``preload``            build the network at server start (default ``true``).
``threads``            torch CPU threads of the server (default: torch's choice).
``max_clicks_per_slice`` clicks one request may put on one slice (default 64); more is answered 413.
``max_boxes``          boxes (``roi``) one request may carry (default 32); more is answered 413.
``max_upload_mb``      largest request body, uploads included (default 2048 MiB); larger is answered 413 unread.
any other key          overrides that id of ``configs/inference.json``: ``weights``, ``batch_size 4``,
                       ``min_contrast 5``, ... (values are read as JSON where they parse).
=====================  =================================================================================================
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelException
from monailabel.utils.others.generic import strtobool

from bundle.config import BUNDLE_ROOT
from bundle.quiet import quiet_third_party

from . import guard
from .datastore import CheckedLocalDatastore
from .infer import SAMUNetInferTask
from .requests import RequestError, RequestLimits, check_label_names
from .train import SAMUNetTrainTask

logger = logging.getLogger(__name__)

MODEL_NAME = "sam_unet"


#: ``--conf`` keys the app itself reads; any other key names a ``configs/inference.json`` id to override
APP_OPTIONS = (
    "models",
    "network",
    "device",
    "cache_mb",
    "modality",
    "default_modality",
    "mode",
    "labels",
    "volume_cache_mb",
    "session_mb",
    "session_ttl_s",
    "model_dir",
    "preload",
    "threads",
    "max_clicks_per_slice",
    "max_boxes",
    "max_upload_mb",
)


def _conf_value(text):
    """A ``--conf`` value: JSON where it parses (numbers, booleans, lists), else the string itself."""
    try:
        return json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return text


def inference_overrides(conf: dict, bundle_root: Path = BUNDLE_ROOT) -> dict:
    """``configs/inference.json`` ids set by the app's ``--conf`` values (everything else comes from the config).

    ``network`` is a JSON object of ``SAMUNet`` arguments (``network_def#...`` ids), ``device`` a torch device name,
    ``cache_mb`` the embedding cache budget; any other key that is an id of the config (``weights``,
    ``batch_size``, ``min_contrast``, ...) overrides that id.
    """
    from bundle.config import bundle_parser

    ids = bundle_parser("configs/inference.json", bundle_root).config
    out: dict = {}
    if conf.get("network"):
        network = _conf_value(conf["network"])
        if not isinstance(network, dict):
            raise ValueError(f"--conf network {conf['network']!r}: expected a JSON object of SAMUNet arguments")
        out.update({f"network_def#{key}": value for key, value in network.items()})
    if conf.get("device"):
        out["device"] = f"$torch.device({str(conf['device'])!r})"
    if conf.get("cache_mb"):
        out["cache_bytes"] = int(float(conf["cache_mb"]) * 2**20)
    for key, value in conf.items():
        if key in APP_OPTIONS:
            continue
        if key in ids:
            out[key] = _conf_value(value)
        else:
            logger.warning("--conf %s: not an option of this app nor an id of configs/inference.json; ignored", key)
    return out


def conf_labels(text) -> dict[str, int] | None:
    """``--conf labels '{"tumour": 1, "organ": 2}'`` -> the label configuration (``None``: the default)."""
    if text in (None, ""):
        return None
    value = _conf_value(text)
    try:
        return check_label_names(value, "--conf labels")
    except ValueError as error:
        raise ValueError(f"{error}; got {text!r}") from None


def _http_error(error: Exception) -> HTTPException:
    status = getattr(error, "status", 400)
    return HTTPException(status_code=status, detail=str(error))


class SAMUNetApp(MONAILabelApp):
    """MONAI Label app serving SAM-UNet: ``sam_unet`` infer (clicks / boxes) and train (fine-tune on saved labels)."""

    def __init__(self, app_dir: str, studies: str, conf: dict):
        quiet_third_party()
        conf = dict(conf or {})
        self.conf_models = [m.strip() for m in str(conf.get("models", MODEL_NAME)).split(",") if m.strip()]
        unknown = [m for m in self.conf_models if m != MODEL_NAME]
        if unknown or not self.conf_models:
            raise ValueError(
                f"--conf models {conf.get('models')!r}: unknown model(s) {unknown}; available: {MODEL_NAME}"
            )
        self.overrides = inference_overrides(conf)
        self.model_dir = Path(conf.get("model_dir") or os.path.join(app_dir, "model"))
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.published_weights = self.model_dir / f"{MODEL_NAME}.pt"
        self.preload = bool(strtobool(conf.get("preload", "true")))
        defaults = RequestLimits()
        self.limits = RequestLimits(
            max_clicks_per_slice=int(conf.get("max_clicks_per_slice", defaults.max_clicks_per_slice)),
            max_boxes=int(conf.get("max_boxes", defaults.max_boxes)),
        )
        self.uploads = guard.UploadRegistry(
            os.path.join(app_dir, "uploads"), max_bytes=int(float(conf.get("max_upload_mb", 2048)) * 2**20)
        )
        if conf.get("threads"):
            import torch

            torch.set_num_threads(int(conf["threads"]))
        bundle_version = "unknown"
        metadata = BUNDLE_ROOT / "configs" / "metadata.json"
        if metadata.is_file():
            bundle_version = json.loads(metadata.read_text()).get("version", bundle_version)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SAM-UNet",
            description="SAM-UNet / LiteMedSAM interactive segmentation with cached slice embeddings",
            version=str(bundle_version),
        )

    # ------------------------------------------------------------------------------------------------------- init
    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        from monailabel.config import settings

        return CheckedLocalDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self):
        conf = self.conf
        task = SAMUNetInferTask(
            published_weights=self.published_weights,
            overrides=self.overrides,
            bundle_root=BUNDLE_ROOT,
            modality=conf.get("modality"),
            default_modality=conf.get("default_modality", "ct"),
            volume_cache_bytes=int(float(conf.get("volume_cache_mb", 512)) * 2**20),
            session_bytes=int(float(conf.get("session_mb", 256)) * 2**20),
            session_ttl_s=float(conf.get("session_ttl_s", 1800)),
            default_mode=conf.get("mode", "2d"),
            labels=conf_labels(conf.get("labels")),
            allowed_roots=[self.studies, self.uploads.folder] if not self.studies.startswith("http") else None,
            limits=self.limits,
            preload=False,  # built in on_init_complete: the server loads it, a background train process does not
        )
        return {MODEL_NAME: task}

    def init_trainers(self):
        return {
            MODEL_NAME: SAMUNetTrainTask(
                bundle_root=BUNDLE_ROOT,
                published_weights=self.published_weights,
                overrides=self.overrides,
                default_modality=self.conf.get("default_modality", "ct"),
            )
        }

    def init_scoring_methods(self):
        return {}

    def on_init_complete(self):
        super().on_init_complete()
        _bind_loopback_unless_told()
        _install_error_handlers(self)
        if self.preload:
            self._infers[MODEL_NAME].ensure_network()

    # ------------------------------------------------------------------------------------------------------ infer
    def infer(self, request, datastore=None):
        """Validate the model (404) and the image (:meth:`readable_image`), never save the result in the datastore,
        map bad requests to 4xx."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(self._infers)}")
        request = dict(request)
        request["image"] = self.readable_image(request.get("image"), datastore)
        request["save_label"] = False  # inference never writes into the datastore
        try:
            return super().infer(request, datastore)
        except (RequestError, HTTPException):
            raise
        except MONAILabelException as error:
            raise HTTPException(status_code=400, detail=error.msg) from None

    def readable_image(self, image, datastore=None) -> str:
        """The file an infer request may read for ``image``: a datastore image id (its file), a file this server
        received with the request (an infer-with-upload or a session), or an absolute path inside the studies folder.
        Anything else is refused: 400 (not a name), 404 (no such id) or 403 (a path outside the datastore, relative
        paths included: they are never resolved against the server's working folder)."""
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=400, detail="no image: give an image id from the datastore")
        if self.uploads.holds(image):
            return image
        ds = datastore if datastore else self.datastore()
        uri = ds.get_image_uri(image)
        if uri:
            return uri
        looks_like_path = os.path.isabs(image) or any(sep in image for sep in ("/", "\\")) or image.startswith(".")
        if not looks_like_path:
            raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore")
        studies = os.path.realpath(self.studies) if not self.studies.startswith(("http://", "https://")) else None
        real = os.path.realpath(image)
        if studies and os.path.isabs(image) and os.path.commonpath([studies, real]) == studies:
            return real
        raise HTTPException(
            status_code=403,
            detail=f"image {image!r} is a path outside the datastore; give the id of an image in the datastore "
            "(GET /datastore/?output=all lists them) or upload the file with the request",
        )

    def train(self, request):
        try:
            return super().train(request)
        except MONAILabelException as error:
            raise HTTPException(status_code=400, detail=error.msg) from None


def _bind_loopback_unless_told() -> None:
    """Make ``monailabel start_server`` bind to 127.0.0.1 unless its command line names a host.

    ``start_server``'s own default is ``0.0.0.0`` (every interface). uvicorn runs the app's start-up (this call)
    before it binds its socket, so when ``--host`` / ``-i`` was not given the pending uvicorn ``Config`` is switched to
    the loopback address. ``--host 0.0.0.0`` (told otherwise) is left alone. (With ``--workers`` > 1 uvicorn binds
    before start-up; pass ``--host`` explicitly then.)
    """
    argv = sys.argv[1:]
    if "start_server" not in argv or any(a in ("-i", "--host") or a.startswith("--host=") for a in argv):
        return
    import gc

    import uvicorn

    for obj in gc.get_objects():
        if isinstance(obj, uvicorn.Config) and obj.host == "0.0.0.0":
            obj.host = "127.0.0.1"
            logger.info("no --host given: binding to 127.0.0.1 (pass --host 0.0.0.0 to serve other machines)")


def _install_error_handlers(label_app: SAMUNetApp) -> None:
    """Answer bad requests with 4xx and a message instead of MONAI Label's 500 (server mode only).

    MONAI Label's endpoints ``json.loads`` the ``params`` form field and let the app's exceptions through; the
    handlers turn a malformed ``params`` JSON and this app's :class:`RequestError` into 400-class JSON answers, and
    :func:`bundle.label.guard.install` adds the checks the endpoints lack (JSON objects, body size, uploads).
    """
    fastapi_app = getattr(sys.modules.get("monailabel.app"), "app", None)
    if fastapi_app is None:
        return
    from fastapi.responses import JSONResponse

    async def bad_json(_request, error: json.JSONDecodeError):
        return JSONResponse(status_code=400, content={"detail": f"malformed JSON in request parameters: {error}"})

    async def bad_request(_request, error: RequestError):
        return JSONResponse(status_code=error.status, content={"detail": str(error)})

    fastapi_app.add_exception_handler(json.JSONDecodeError, bad_json)
    fastapi_app.add_exception_handler(RequestError, bad_request)
    guard.install(fastapi_app, label_app.uploads, label_app.sessions())
    fastapi_app.middleware_stack = None  # rebuilt with the new handlers on the next request
