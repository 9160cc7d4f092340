"""MONAI Label app entry point: ``monailabel start_server --app bundle/label/app --studies <dir> --conf models sam_unet``.

The app itself lives in :mod:`bundle.label.server` (installed with the package); this file only exposes it, as MONAI
Label looks for a ``MONAILabelApp`` subclass in ``<app dir>/main.py``.
"""

from bundle.label.server import SAMUNetApp

__all__ = ["SAMUNetApp"]
