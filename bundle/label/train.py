"""The MONAI Label train task: fine-tune through ``configs/train.json`` on the labels saved in the datastore.

Steps (run by MONAI Label in a background process, or in the server with ``run_sync``):

1. the datastore's image/label pairs with the ``final`` tag (the labels users saved) are converted to SA-Med2D-style
   2D slices (:func:`bundle.data.convert.convert_to_sa_med2d`) in a fresh work folder under ``<app>/model/train``;
2. ``configs/train.json`` runs (``monai.bundle.run``) with overrides: that data for training and validation, the
   app's network configuration starting from the weights the server is using, the request's epochs / batch size /
   learning rate, checkpoints in the work folder, and the pixel normalisation the inferer uses;
3. the best checkpoint (``model.pt``, key metric) or else the final one is checked to load into the network and
   published atomically to ``<app>/model/<name>.pt`` (``{"model": state_dict}``). The infer task sees the new file
   and reloads its weights (clearing its embedding cache) before its next request.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import device_list, name_to_device

logger = logging.getLogger(__name__)


class SAMUNetTrainTask(TrainTask):
    """Fine-tune the server's SAM-UNet on the datastore's saved (``final``) labels through ``configs/train.json``.

    Args:
        bundle_root: the bundle (holds ``configs/train.json`` and ``configs/metadata.json``).
        published_weights: where the trained weights are published (the infer task watches this file).
        network: SAMUNet keyword arguments of the served network.
        initial_weights: weights to start from while nothing is published yet (a file or ``"litemedsam"``).
        pixel_normalization: ``"litemedsam"`` or ``"sam"``, as the inferer uses.
        default_modality: modality of volumes without one (``"ct"``, ``"mr"``, ...).
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike,
        published_weights: str | os.PathLike,
        network: dict,
        initial_weights: str | None = "litemedsam",
        pixel_normalization: str = "litemedsam",
        default_modality: str | None = "ct",
        description: str = "Fine-tune SAM-UNet on the labels saved in the datastore (configs/train.json)",
    ) -> None:
        super().__init__(description)
        self.bundle_root = Path(bundle_root).resolve()
        self.config_file = self.bundle_root / "configs" / "train.json"
        self.meta_file = self.bundle_root / "configs" / "metadata.json"
        self.published_weights = Path(published_weights)
        self.work_root = self.published_weights.parent / "train"
        self.network = dict(network)
        self.initial_weights = initial_weights
        self.pixel_normalization = pixel_normalization
        self.default_modality = default_modality
        self._stats: dict = {}

    def config(self):
        return {
            "device": device_list(),
            "max_epochs": 2,
            "epoch_length": 0,  # 0: every training slice once per epoch
            "batch_size": 4,
            "learning_rate": 1e-5,
            "interactive_iterations": 2,
            "masks_per_image": 1,
        }

    def stats(self):
        """The last run's summary (written beside the published weights, so the server sees a background run's)."""
        summary = self.published_weights.with_suffix(".json")
        if summary.is_file():
            try:
                return json.loads(summary.read_text())
            except (OSError, ValueError):
                pass
        return self._stats

    def is_valid(self) -> bool:
        return self.config_file.is_file()

    # ---------------------------------------------------------------------------------------------------- helpers
    def start_weights(self) -> str | None:
        return str(self.published_weights) if self.published_weights.is_file() else self.initial_weights

    def overrides(self, request: dict, data_dir: Path, run_dir: Path) -> dict:
        device = name_to_device(request.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        epoch_length = int(request.get("epoch_length") or 0) or None
        out = {
            "bundle_root": str(self.bundle_root),
            "device": f"$torch.device('{device}')",
            "amp": str(device).startswith("cuda"),
            "dataset_dir": str(data_dir),
            "train_json": str(data_dir / "image2label_train.json"),
            "val_json": str(data_dir / "label2image_train.json"),
            "ckpt_dir": str(run_dir / "models"),
            "output_dir": str(run_dir / "eval"),
            "cache_dir": str(run_dir / "cache"),
            "cache": "none",
            "num_workers": 0,
            "progress_bar": False,
            "resume": False,
            "weights": self.start_weights(),
            "pixel_normalization": self.pixel_normalization,
            "max_epochs": int(request.get("max_epochs", 2)),
            "epoch_length": epoch_length,
            "batch_size": int(request.get("batch_size", 4)),
            "val_batch_size": int(request.get("batch_size", 4)),
            "learning_rate": float(request.get("learning_rate", 1e-5)),
            "interactive_iterations": int(request.get("interactive_iterations", 2)),
            "masks_per_image": int(request.get("masks_per_image", 1)),
            "lr_milestones": [10**6],
        }
        for key, value in self.network.items():
            out[f"network_def#{key}"] = value
        # the datastore's slices are small: TensorBoard logs stay in the run folder, nothing else is written
        return out

    def _publish(self, run_dir: Path) -> tuple[str, Path]:
        from bundle.networks import SAMUNet
        from bundle.networks.weights import read_state_dict

        models = run_dir / "models"
        for name in ("model.pt", "checkpoint_final.pt"):
            candidate = models / name
            if candidate.is_file():
                break
        else:
            raise RuntimeError(f"training wrote no checkpoint in {models}")
        state = read_state_dict(candidate)
        SAMUNet(**self.network).load_state_dict(state, strict=True)  # refuse a checkpoint of another architecture
        self.published_weights.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.published_weights.with_name(f".{self.published_weights.name}.tmp-{os.getpid()}")
        torch.save({"model": state}, tmp)
        os.replace(tmp, self.published_weights)
        return name, candidate

    # -------------------------------------------------------------------------------------------------------- run
    def __call__(self, request, datastore: Datastore):
        import monai.bundle

        from bundle.data.convert import Case, convert_to_sa_med2d

        start = time.time()
        logger.info("SAM-UNet train request: %s", request)
        pairs = [d for d in datastore.datalist() if d and d.get("label")]
        if not pairs:
            raise ValueError("no saved labels in the datastore (tag 'final'): save at least one label before training")
        self.work_root.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=self.work_root))
        data_dir = run_dir / "data"
        modality = request.get("modality") or self.default_modality
        cases = [Case(image=d["image"], label=d["label"], case=f"case{n:04d}") for n, d in enumerate(pairs)]
        report = convert_to_sa_med2d(
            cases, data_dir, "MONAILabel", fractions=(1.0, 0.0, 0.0), modality=modality, progress=False
        )
        logger.info("training data: %s", report.summary())
        if report.images == 0:
            raise ValueError(f"the saved labels gave no training slice ({report.summary()})")
        overrides = self.overrides(request, data_dir, run_dir)
        logger.info("running %s with overrides %s", self.config_file, overrides)
        monai.bundle.run(config_file=str(self.config_file), meta_file=str(self.meta_file), **overrides)
        used, checkpoint = self._publish(run_dir)
        keep = request.get("keep_run_dir", False)
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        self._stats = {
            "published": str(self.published_weights),
            "from_checkpoint": used,
            "images": report.images,
            "masks": report.masks,
            "cases": len(cases),
            "run_dir": str(run_dir),
            "total_time": round(time.time() - start, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with open(self.published_weights.with_suffix(".json"), "w") as f:
            json.dump(self._stats, f, indent=1)
        logger.info("SAM-UNet training finished: %s", self._stats)
        return self._stats
