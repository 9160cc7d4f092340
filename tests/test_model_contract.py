"""One model contract from training to every front end, on the committed real crops, as a user runs it.

``configs/train.json`` trains two iterations (its default SAM-UNet-Lite network, no architecture override); the
``models/model.pt`` it writes then runs, again with no architecture override, in ``configs/inference.json``, in a
real MONAI Label server (whose 3D mask equals the CLI's), in ``monai.bundle ckpt_export`` and in
``scripts/export.py``. A config that contradicts the checkpoint stops before inference, naming both sides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
LUNG = REPO / "tests" / "data" / "lung1_crop_image.nrrd"
# the tumour of the lung crop on slice 3 (voxels x 36-59, y 35-60), as a slice box [i0, j0, i1, j1]
SLICE_BOX, SLICE = [34, 33, 61, 62], 3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def run(*command: str, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def bundle_run(config: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return run(PYTHON, "-m", "monai.bundle", "run", "--config_file", config, *args, timeout=timeout)


def labels_of(path) -> np.ndarray:
    from bundle.io import load_image

    return np.asarray(load_image(str(path)))[0] > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, test_data_dir) -> Path:
    """``models/model.pt`` of a two-iteration run of configs/train.json on the lung CT crop (validation: breast MR)."""
    root = tmp_path_factory.mktemp("contract")
    cases = root / "cases.json"
    cases.write_text(
        json.dumps(
            [
                {
                    "image": str(test_data_dir / f"{case}_image.nrrd"),
                    "label": str(test_data_dir / f"{case}_label.nrrd"),
                    "modality": modality,
                }
                for case, modality in (("lung1_crop", "ct"), ("breast1_crop", "mr"))
            ]
        )
    )
    data = root / "data"
    run(
        PYTHON,
        "scripts/prepare_sa_med2d.py",
        "--datalist",
        str(cases),
        "--dataset",
        "Crops",
        "--split",
        "0.5",
        "0.5",
        "0",
        "--output",
        str(data),
        "--quiet",
    )
    splits = json.loads((data / "splits.json").read_text())
    assert len(splits["train"]) == 1 and len(splits["validation"]) == 1
    models = root / "models"
    done = bundle_run(
        "configs/train.json",
        *("--dataset_dir", str(data), "--ckpt_dir", str(models), "--output_dir", str(root / "eval")),
        *("--batch_size", "1", "--val_batch_size", "2", "--masks_per_image", "1", "--interactive_iterations", "1"),
        *("--max_epochs", "1", "--epoch_length", "2", "--num_workers", "0", "--cache", "none"),
    )
    assert "tiny_vit + resnet34 branch, fusion, sam tokens" in done.stdout + done.stderr
    checkpoint = models / "model.pt"
    saved = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert set(saved) == {"model", "network", "checkpointer"}  # checkpointer: its best-metric record, for resumes
    assert saved["network"]["architecture"] == {
        "backbone": "tiny_vit",
        "image_size": 256,
        "conv_branch": "resnet34",
        "fusion": True,
        "decoder_tokens": "sam",
    }
    assert saved["network"]["pixel_normalization"] == "litemedsam" and len(saved["network"]["fingerprint"]) == 16
    return checkpoint


@pytest.fixture(scope="module")
def cli_mask(trained, tmp_path_factory) -> np.ndarray:
    """The trained model through configs/inference.json: a box on slice 3, propagated."""
    out = tmp_path_factory.mktemp("cli")
    done = bundle_run(
        "configs/inference.json",
        *("--weights", str(trained), "--input_image", str(LUNG), "--modality", "ct"),
        *("--slice_box", json.dumps(SLICE_BOX), "--slice_index", str(SLICE), "--output_dir", str(out)),
    )
    assert "(its model contract): tiny_vit + resnet34 branch, fusion" in done.stdout + done.stderr
    mask = labels_of(out / "lung1_crop_image_seg.nii.gz")
    assert mask[..., SLICE].any()
    return mask


def test_inference_config_builds_the_trained_network(cli_mask):
    assert len(set(np.nonzero(cli_mask)[2].tolist())) > 1  # propagated beyond the prompted slice


def test_monai_label_serves_the_trained_checkpoint_like_the_cli(trained, cli_mask, tmp_path):
    pytest.importorskip("monailabel")
    from monailabel.client import MONAILabelClient

    from bundle.label.launch import LabelServer

    studies = tmp_path / "studies"
    studies.mkdir()
    with LabelServer(studies, tmp_path / "work", conf={"weights": str(trained), "threads": "2"}) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path / "client"))
        client.upload_image(str(LUNG), "lung1_crop")
        roi = [SLICE_BOX[0], SLICE_BOX[2], SLICE_BOX[1], SLICE_BOX[3], SLICE, SLICE]  # Slicer's x0, x1, y0, y1, z0, z1
        path, info = client.infer("sam_unet", "lung1_crop", {"roi": roi, "mode": "3d"})
    assert info["model_version"].startswith("model.pt:")
    served = labels_of(path)
    assert len(info["slices"]) > 1 and len(set(np.nonzero(served)[2].tolist())) > 1
    assert np.array_equal(served, cli_mask)


def test_ckpt_export_and_export_script_take_the_checkpoint_as_it_is(trained, tmp_path, test_data_dir):
    from bundle.networks import SAMUNet

    torchscript = tmp_path / "model.ts"
    run(
        PYTHON,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "export_network",
        "--config_file",
        "configs/inference.json",
        "--ckpt_file",
        str(trained),
        "--filepath",
        str(torchscript),
    )
    network = SAMUNet(weights=str(trained)).eval()
    image, boxes = torch.rand(1, 3, 256, 256), torch.tensor([[40.0, 50.0, 180.0, 200.0]])
    with torch.no_grad():
        expected = network(image, boxes=boxes)
        assert (torch.jit.load(str(torchscript))(image, boxes) - expected).abs().max().item() < 1e-4
    onnx_dir = tmp_path / "onnx"
    run(PYTHON, "scripts/export.py", "--checkpoint", str(trained), "--output-dir", str(onnx_dir))
    from bundle.export import OnnxSAMUNet

    runtime = OnnxSAMUNet(onnx_dir / "encoder.onnx", onnx_dir / "decoder.onnx")
    assert runtime.config == network.config and runtime.pixel_normalization == "litemedsam"
    assert (runtime(image, boxes=boxes) - expected).abs().max().item() < 1e-3


def test_a_config_that_contradicts_the_checkpoint_stops_before_inference(trained, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [PYTHON, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--weights", str(trained),
         "--network_def#conv_branch", "none", "--input_image", str(LUNG), "--modality", "ct",
         "--slice_box", json.dumps(SLICE_BOX), "--slice_index", str(SLICE), "--output_dir", str(out)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 0
    assert "conv_branch: checkpoint 'resnet34', config 'none'" in done.stderr
    assert f"{trained} holds a tiny_vit + resnet34 branch" in done.stderr
    assert not out.exists()
