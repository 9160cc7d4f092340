"""The MONAI Label train task: fine-tune through ``configs/train.json`` on the labels saved in the datastore.

Steps (run by MONAI Label in a background process, or in the server with ``run_sync``):

1. the datastore's image/label pairs with the ``final`` tag (the labels users saved; at least two) are converted to
   SA-Med2D-style 2D slices (:func:`bundle.data.convert.convert_to_sa_med2d`) in a fresh work folder under
   ``<app>/model/train``, split by case: about a fifth of the cases, at least one, are held out for validation and
   never trained on;
2. the served model (the published weights, else the server's initial ones) is measured on the held-out slices:
   mean box-prompt Dice, as ``configs/train.json`` validates;
3. ``configs/train.json`` runs (``monai.bundle.run``) with overrides: the training cases, the held-out cases for
   validation, the served network (its architecture and pixel normalisation, read from the weights the server is
   using) starting from those weights, the request's epochs / batch size / learning rate, checkpoints in the work
   folder;
4. the best checkpoint (``model.pt``, key metric) or else the final one is checked to build the served network and
   measured on the same held-out slices. When its Dice is at least the served model's, it is published atomically
   to ``<app>/model/<name>.pt`` (``{"model": state_dict, "network": contract}``); the infer task sees the new file
   and rebuilds its network from it (clearing its embedding cache) before its next request. When it is worse, the
   served model stays and the new one is kept beside it as ``<name>_rejected.pt``. Both figures are in the task's
   stats (``/info`` ``train_stats``).
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

from bundle.config import bundle_parser
from bundle.io import atomic_write
from bundle.quiet import quiet_third_party

logger = logging.getLogger(__name__)


class SAMUNetTrainTask(TrainTask):
    """Fine-tune the server's SAM-UNet on the datastore's saved (``final``) labels through ``configs/train.json``.

    Args:
        bundle_root: the bundle (holds ``configs/train.json``, ``configs/inference.json`` and ``configs/metadata.json``).
        published_weights: where the trained weights are published (the infer task watches this file).
        overrides: the ``configs/inference.json`` ids the app's ``--conf`` sets (``weights``, ``network_def#...``,
            the pixel normalisation): they say which network is served and from which weights it starts.
        default_modality: modality of volumes without one (``"ct"``, ``"mr"``, ...).
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike,
        published_weights: str | os.PathLike,
        overrides: dict | None = None,
        default_modality: str | None = "ct",
        description: str = "Fine-tune SAM-UNet on the labels saved in the datastore (configs/train.json)",
    ) -> None:
        super().__init__(description)
        self.bundle_root = Path(bundle_root).resolve()
        self.config_file = self.bundle_root / "configs" / "train.json"
        self.meta_file = self.bundle_root / "configs" / "metadata.json"
        self.published_weights = Path(published_weights)
        self.rejected_weights = self.published_weights.with_name(f"{self.published_weights.stem}_rejected.pt")
        self.work_root = self.published_weights.parent / "train"
        self.serving = dict(overrides or {})
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
        """The published checkpoint, else the served network's initial weights."""
        if self.published_weights.is_file():
            return str(self.published_weights)
        if "weights" in self.serving:
            return self.serving["weights"]
        return bundle_parser("configs/inference.json", self.bundle_root).get_parsed_content("weights")

    def network_overrides(self, weights: str | None) -> dict:
        """``configs/train.json`` ids that build the served network: its architecture and pixel normalisation."""
        from bundle.networks import read_weights, resolve_network_args
        from bundle.networks.contract import config_overrides, explicit_arguments

        source = read_weights(weights) if weights else None
        return config_overrides(resolve_network_args(explicit_arguments(self.serving), source))

    def overrides(self, request: dict, data_dir: Path, run_dir: Path) -> dict:
        weights = self.start_weights()
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
            "val_json": str(data_dir / "label2image_validation.json"),
            "ckpt_dir": str(run_dir / "models"),
            "output_dir": str(run_dir / "eval"),
            "cache_dir": str(run_dir / "cache"),
            "cache": "none",
            "num_workers": 0,
            "progress_bar": False,
            "resume": False,
            "weights": weights,
            "max_epochs": int(request.get("max_epochs", 2)),
            "epoch_length": epoch_length,
            "batch_size": int(request.get("batch_size", 4)),
            "val_batch_size": int(request.get("batch_size", 4)),
            "learning_rate": float(request.get("learning_rate", 1e-5)),
            "interactive_iterations": int(request.get("interactive_iterations", 2)),
            "masks_per_image": int(request.get("masks_per_image", 1)),
            "lr_milestones": [10**6],
        }
        # the datastore's slices are small: TensorBoard logs stay in the run folder, nothing else is written
        return {**out, **self.network_overrides(weights)}

    def held_out_dice(self, overrides: dict, weights: str) -> float:
        """Mean box-prompt Dice of ``weights`` on the held-out slices (``val_json``), as train.json validates."""
        evaluate = {**overrides, **self.network_overrides(weights), "weights": weights, "validate#handlers": []}
        evaluator = bundle_parser("configs/train.json", self.bundle_root, evaluate).get_parsed_content(
            "validate#evaluator"
        )
        evaluator.run()
        return float(evaluator.state.metrics["val_mean_dice"])

    def _candidate(self, run_dir: Path, trained: dict) -> tuple[str, Path]:
        """The run's best (else final) checkpoint, checked to build the network that was trained."""
        from bundle.networks import SAMUNet
        from bundle.networks.contract import config_overrides, network_arguments

        models = run_dir / "models"
        for name in ("model.pt", "checkpoint_final.pt"):
            candidate = models / name
            if candidate.is_file():
                break
        else:
            raise RuntimeError(f"training wrote no checkpoint in {models}")
        network = SAMUNet(weights=str(candidate))  # checks the contract, the fingerprint and every key
        built = config_overrides(network_arguments(network))
        if built != trained:
            raise RuntimeError(f"{candidate} builds {built}, not the trained network {trained}")
        return name, candidate

    @staticmethod
    def _write_model(checkpoint: Path, target: Path) -> None:
        """``{"model", "network"}`` of ``checkpoint`` (no optimiser state) written atomically to ``target``."""
        from bundle.networks.contract import CONTRACT_KEY
        from bundle.networks.weights import read_checkpoint

        state, contract = read_checkpoint(checkpoint)
        with atomic_write(target) as tmp:
            torch.save({"model": state, CONTRACT_KEY: contract}, tmp)

    # -------------------------------------------------------------------------------------------------------- run
    def __call__(self, request, datastore: Datastore):
        import monai.bundle

        from bundle.data.convert import Case, convert_to_sa_med2d

        quiet_third_party()
        start = time.time()
        logger.info("SAM-UNet train request: %s", request)
        pairs = [d for d in datastore.datalist() if d and d.get("label")]
        if len(pairs) < 2:
            raise ValueError(
                f"{len(pairs)} saved label(s) in the datastore (tag 'final'): training needs at least 2, as one is "
                "held out to check the new model against the served one before it is published"
            )
        self.work_root.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=self.work_root))
        data_dir = run_dir / "data"
        modality = request.get("modality") or self.default_modality
        cases = [Case(image=d["image"], label=d["label"], case=f"case{n:04d}") for n, d in enumerate(pairs)]
        report = convert_to_sa_med2d(
            cases, data_dir, "MONAILabel", fractions=(0.8, 0.2, 0.0), modality=modality, progress=False
        )
        logger.info("training data: %s", report.summary())
        held_out = report.splits["validation"]
        for split, listing in (("train", "image2label_train.json"), ("validation", "label2image_validation.json")):
            if not json.loads((data_dir / listing).read_text()):
                raise ValueError(f"the {split} case(s) {report.splits[split]} gave no slice ({report.summary()})")
        overrides = self.overrides(request, data_dir, run_dir)
        served = overrides["weights"]
        served_dice = self.held_out_dice(overrides, served)
        logger.info("served model %s: Dice %.4f on the held-out case(s) %s", served, served_dice, held_out)
        logger.info("running %s with overrides %s", self.config_file, overrides)
        monai.bundle.run(config_file=str(self.config_file), meta_file=str(self.meta_file), **overrides)
        used, checkpoint = self._candidate(run_dir, self.network_overrides(served))
        trained_dice = self.held_out_dice(overrides, str(checkpoint))
        published = trained_dice >= served_dice
        self._write_model(checkpoint, self.published_weights if published else self.rejected_weights)
        logger.info(
            "trained model: Dice %.4f against the served model's %.4f on the held-out case(s): %s",
            trained_dice,
            served_dice,
            f"published to {self.published_weights}" if published else f"kept as {self.rejected_weights}",
        )
        if not request.get("keep_run_dir", False):
            shutil.rmtree(data_dir, ignore_errors=True)
        self._stats = {
            "published": published,
            "model": str(self.published_weights if published else self.rejected_weights),
            "served_model": str(served),
            "served_dice": round(served_dice, 4),
            "trained_dice": round(trained_dice, 4),
            "validation": "mean box-prompt Dice on the held-out case(s), never trained on",
            "validation_cases": len(held_out),
            "training_cases": len(report.splits["train"]),
            "from_checkpoint": used,
            "images": report.images,
            "masks": report.masks,
            "cases": len(cases),
            "run_dir": str(run_dir),
            "total_time": round(time.time() - start, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with atomic_write(self.published_weights.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(self._stats, indent=1))
        logger.info("SAM-UNet training finished: %s", self._stats)
        return self._stats
