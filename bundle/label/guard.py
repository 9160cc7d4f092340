"""Checks MONAI Label's HTTP endpoints do not make, added to the running server by the SAM-UNet app.

MONAI Label 0.8.5's endpoints ``json.loads`` the ``params`` / ``info`` form fields and use the result as a dict
(a JSON list there is a 500), read request bodies of any size, and hand an infer-with-upload to the app only as a
temporary file path that a client could also name. MONAI Label has no hook for request validation, so
:func:`install` wraps the module-level endpoint functions its routes call (they are looked up at call time) and adds
a request-body limit:

- ``params`` / ``info`` must be JSON objects (400);
- request bodies above ``max_upload_bytes`` are refused with 413 before they are read (:class:`BodyLimit`);
- session ids must be single names (400);
- the file of an infer-with-upload (and its ``label`` upload) is stored in the app's private upload folder and
  registered in :class:`UploadRegistry` for the duration of the request: the app reads an image path only when it is
  in the datastore or registered there (:meth:`bundle.label.server.SAMUNetApp.infer`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import pathlib
import threading
import uuid
from collections.abc import Iterator

from fastapi import HTTPException
from starlette.middleware import Middleware

from .datastore import check_name, name_problem

logger = logging.getLogger(__name__)

#: endpoint functions of MONAI Label that parse a JSON form field: (module, function, field name)
JSON_FIELDS = (
    ("monailabel.endpoints.datastore", "add_image", "params"),
    ("monailabel.endpoints.datastore", "save_label", "params"),
    ("monailabel.endpoints.datastore", "update_image_info", "info"),
    ("monailabel.endpoints.datastore", "update_label_info", "info"),
)


def json_object(text, field: str = "params") -> dict:
    """The JSON object in form field ``field`` (``{}`` when empty); HTTP 400 for malformed JSON or another type."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as error:
        raise HTTPException(status_code=400, detail=f"malformed JSON in {field}: {error}") from None
    if not isinstance(value, dict):
        raise HTTPException(
            status_code=400, detail=f'{field} must be a JSON object such as {{"roi": [...]}}, got {value!r:.80}'
        )
    return value


class UploadRegistry:
    """The files uploaded with requests that are being served now, in a private folder of the server.

    :meth:`receive` copies an upload there (at most ``max_bytes``) and registers it while the request runs; the app
    reads a client-given path only when :meth:`holds` it, so no other file of the machine can be named instead.
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int | None = None) -> None:
        self.folder = os.path.realpath(folder)  # created on the first upload
        self.max_bytes = max_bytes
        self._live: set[str] = set()
        self._lock = threading.Lock()

    def holds(self, path) -> bool:
        with self._lock:
            return isinstance(path, str) and os.path.realpath(path) in self._live

    @contextlib.contextmanager
    def register(self, path: str) -> Iterator[str]:
        """Let the app read ``path`` (a file the server stored itself) while the block runs."""
        real = os.path.realpath(path)
        with self._lock:
            self._live.add(real)
        try:
            yield path
        finally:
            with self._lock:
                self._live.discard(real)

    @contextlib.contextmanager
    def receive(self, upload, what: str = "file") -> Iterator[str | None]:
        """Store ``upload`` (a FastAPI ``UploadFile`` or ``None``) in the folder, registered, and remove it after."""
        if upload is None:
            yield None
            return
        suffix = "".join(pathlib.Path(upload.filename).suffixes) if upload.filename else ".nii.gz"
        if name_problem(f"x{suffix}") or len(suffix) > 20:
            suffix = ""  # the app then refuses the file type by name (415)
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        path = os.path.join(self.folder, f"{uuid.uuid4().hex}{suffix}")
        try:
            with open(path, "wb") as out:
                copied = 0
                for block in iter(lambda: upload.file.read(1 << 20), b""):
                    copied += len(block)
                    if self.max_bytes is not None and copied > self.max_bytes:
                        raise HTTPException(
                            status_code=413,
                            detail=f"{what} upload is larger than the server's limit of {self.max_bytes / 2**20:.0f} "
                            "MiB (--conf max_upload_mb)",
                        )
                    out.write(block)
            with self.register(path):
                yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _checked_json(function, field: str):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if field in bound.arguments:
            bound.arguments[field] = json.dumps(json_object(bound.arguments[field], field))
        return function(*bound.args, **bound.kwargs)

    checked.__sam_unet_guard__ = True
    return checked


def _checked_inference(function, uploads: UploadRegistry, sessions):
    """MONAI Label's ``run_inference`` with the upload stored by ``uploads`` and a checked ``params`` object."""

    @functools.wraps(function)
    def run_inference(
        background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None
    ):
        request = json_object(params, "params")
        if not file and not image and not session_id:
            raise HTTPException(status_code=400, detail="no image: give an image id, upload a file or a session_id")
        if session_id:
            check_name(session_id, "session_id")
        with uploads.receive(file, "image") as image_file, uploads.receive(label, "label") as label_file:
            if image_file:
                image = image_file  # as MONAI Label does: the upload replaces the query's image
            if label_file and "label" not in request:
                request["label"] = label_file
            with contextlib.ExitStack() as stack:
                session = sessions.get_session(session_id) if session_id and sessions is not None else None
                if session is not None:
                    stack.enter_context(uploads.register(session.image))
                return function(background_tasks, model, image, session_id, json.dumps(request), None, None, output)

    run_inference.__sam_unet_guard__ = True
    return run_inference


def install(fastapi_app, uploads: UploadRegistry, sessions=None) -> None:
    """Wrap MONAI Label's endpoint functions and set the request-body limit of ``fastapi_app`` (idempotent)."""
    import importlib

    for module_name, name, field in JSON_FIELDS:
        module = importlib.import_module(module_name)
        function = getattr(module, name)
        if not getattr(function, "__sam_unet_guard__", False):
            setattr(module, name, _checked_json(function, field))
    infer = importlib.import_module("monailabel.endpoints.infer")
    if not getattr(infer.run_inference, "__sam_unet_guard__", False):
        infer.run_inference = _checked_inference(infer.run_inference, uploads, sessions)
    if uploads.max_bytes is not None and not any(m.cls is BodyLimit for m in fastapi_app.user_middleware):
        fastapi_app.user_middleware.insert(0, Middleware(BodyLimit, max_bytes=int(uploads.max_bytes)))
    fastapi_app.middleware_stack = None  # rebuilt with the limit on the next request


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a JSON 413 that names the limit and the option.

    Starlette's own ``max_body_size`` answers a plain ``Content Too Large`` and replaces whatever response the app
    gives to a request whose Content-Length is over the limit, so its answer cannot say how to raise the limit. A
    declared length over the limit is answered before anything is read; a chunked body is counted as it arrives
    (the endpoint's read raises an HTTPException, answered by FastAPI's handler).
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, int(max_bytes)
        self.detail = (
            f"request body larger than the server's limit of {self.max_bytes / 2**20:.0f} MiB "
            "(MONAI Label app option --conf max_upload_mb)"
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers
        from starlette.exceptions import HTTPException as StarletteHTTPException
        from starlette.responses import JSONResponse

        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
        total = 0

        async def counted():
            nonlocal total
            message = await receive()
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                raise StarletteHTTPException(status_code=413, detail=self.detail)
            return message

        return await self.app(scope, counted, send)
