"""The bundle's configs read from Python: one parser for every front end that builds what the configs define.

The CLI (``python -m monai.bundle run``), the MONAI Label server, federated sites and the export script all read the
same ``configs/*.json`` with overrides, so they build the same network and inferer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

#: the bundle root of this installation (holds ``configs/``)
BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def bundle_parser(
    config_files: str | Sequence[str] = "configs/inference.json",
    bundle_root: str | os.PathLike = BUNDLE_ROOT,
    overrides: Mapping | None = None,
):
    """A MONAI ``ConfigParser`` of ``config_files`` (relative to ``bundle_root``) with ``bundle_root`` and
    ``overrides`` (config id -> value, as ``monai.bundle run --id value``) set; nothing is instantiated yet."""
    from monai.bundle import ConfigParser

    bundle_root = os.fspath(bundle_root)
    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    files = [os.fspath(f) if os.path.isabs(f) else os.path.join(bundle_root, f) for f in files]
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"bundle config {path} not found (bundle_root {bundle_root!r})")
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = bundle_root
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser
