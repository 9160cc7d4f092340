"""MONAI Label integration: an app serving SAM-UNet for click / box segmentation and fine-tuning.

- :mod:`bundle.label.requests`: MONAI Label request fields -> validated prompt plans (no MONAI Label import);
- :mod:`bundle.label.infer`: ``SAMUNetInferTask``, cached slice embeddings, masks with the image's geometry;
- :mod:`bundle.label.train`: ``SAMUNetTrainTask``, fine-tuning through ``configs/train.json`` on saved labels;
- :mod:`bundle.label.datastore`: a local datastore that refuses non-image uploads;
- :mod:`bundle.label.server`: ``SAMUNetApp``; ``bundle/label/app/`` is the directory to pass as ``--app``.

See docs/monailabel.md. Needs the ``label`` extra (``pip install 'sam-unet-bundle[label]'``).
"""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "app"

__all__ = ["APP_DIR"]
