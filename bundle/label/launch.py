"""Start and stop a MONAI Label server running the SAM-UNet app (for tests, benchmarks and scripts).

``monailabel start_server`` creates ``model/``, ``lib/``, ``logs/`` and ``bin/`` inside the app folder, so
:func:`launch` runs a copy of ``bundle/label/app`` in a scratch folder unless told otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import APP_DIR

REPO_ROOT = APP_DIR.parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def copy_app(target: str | os.PathLike) -> Path:
    """Copy the app folder (``main.py``) to ``target`` and return it."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(APP_DIR / "main.py", target / "main.py")
    return target


class LabelServer:
    """A ``monailabel start_server`` subprocess in its own process group; use as a context manager.

    Args:
        studies: the datastore folder.
        app_dir: the app folder to run (default: a copy of ``bundle/label/app`` under ``workdir``).
        workdir: scratch folder for the app copy and the server log.
        conf: ``--conf`` pairs (``models`` defaults to ``sam_unet``).
        host, port: where to bind (default 127.0.0.1 and a free port); ``host=None`` passes no ``--host``.
        timeout: seconds to wait for the server to answer ``/info/``.
    """

    def __init__(
        self,
        studies: str | os.PathLike,
        workdir: str | os.PathLike,
        app_dir: str | os.PathLike | None = None,
        conf: dict | None = None,
        host: str | None = "127.0.0.1",
        port: int | None = None,
        timeout: float = 600.0,
        env: dict | None = None,
    ) -> None:
        self.studies = Path(studies)
        self.workdir = Path(workdir)
        self.app_dir = Path(app_dir) if app_dir else copy_app(self.workdir / "app")
        self.conf = {"models": "sam_unet", **(conf or {})}
        self.bind_host = host  # None: no --host on the command line (the app then binds to 127.0.0.1)
        self.host = host if host and host != "0.0.0.0" else "127.0.0.1"
        self.port = port or free_port(self.host)
        self.timeout = timeout
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "monailabel.main",
            "start_server",
            "--app",
            str(self.app_dir),
            "--studies",
            str(self.studies),
        ]
        for key, value in self.conf.items():
            cmd += ["--conf", key, str(value)]
        if self.bind_host is not None:
            cmd += ["--host", self.bind_host]
        return cmd + ["--port", str(self.port)]

    def start(self) -> "LabelServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command(),
            cwd=str(self.workdir),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"MONAI Label server exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/info/", timeout=5) as response:
                    info = json.loads(response.read())
                if "sam_unet" in info.get("models", {}):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"MONAI Label server not ready after {self.timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the server's process group (server and any background train process), then kill it."""
        process = self.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=20)
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def __enter__(self) -> "LabelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
