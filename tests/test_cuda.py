"""CUDA checks (``pytest -m cuda``): skipped without a GPU, so CI on CPU is unchanged; run by scripts/gpu_check.sh.

On a GPU they check that the network, the trainer, the inferer and TensorRT give on CUDA what they give on CPU:
encode/decode in fp32 within 1e-4 of the logits' scale (TF32 off) and in bf16 within the tolerance stated below, one AMP training step of
each training config, the same mask on a real case (>= 99.9 % of voxels), inference_trt.json = PyTorch, and a short
torchrun over NCCL when two GPUs are present.
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
ENV = dict(os.environ, PYTHONPATH=str(REPO))
CUDA = torch.cuda.is_available()

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run scripts/gpu_check.sh)")]

#: bf16 autocast tolerance: the sign of the logits (the mask) agrees on >= 99 % of the pixels of a real slice
BF16_MASK_AGREEMENT = 0.99
LUNG = REPO / "tests" / "data" / "lung1_crop_image.nrrd"
BOX = [34, 33, 2, 61, 62, 4]  # the lung crop's tumour, [i0, j0, k0, i1, j1, k1]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 comparisons need full-precision matmuls and convolutions (no TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def real_slices(network, count: int = 3) -> torch.Tensor:
    from bundle.inferers import normalized_volume, to_slices
    from bundle.io import load_image

    volume = to_slices(normalized_volume(load_image(str(LUNG)), "ct"), axis=2)
    return network.preprocess(torch.as_tensor(np.stack([volume[..., k] for k in range(2, 2 + count)]))[:, None])


@pytest.mark.parametrize(
    "arguments",
    [
        {"weights": "litemedsam"},
        {"backbone": "vit_b", "conv_branch": "resnet34", "fusion": True, "decoder_tokens": "med"},
    ],
    ids=["litemedsam", "sam_unet_vit_b"],
)
def test_network_on_cuda_matches_cpu(arguments):
    from bundle.networks import SAMUNet

    torch.manual_seed(0)
    cpu = SAMUNet(**arguments).eval()
    image = real_slices(cpu)
    boxes = torch.tensor([[60.0, 60.0, 200.0, 200.0]]).expand(image.shape[0], -1)
    with torch.no_grad():
        expected = cpu(image, boxes=boxes)
        gpu = cpu.to("cuda")
        got = gpu(image.cuda(), boxes=boxes.cuda()).cpu()
        # 1e-4 of the logits' scale (random-init ViT-B logits reach tens)
        assert (got - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = gpu(image.cuda(), boxes=boxes.cuda()).float().cpu()
    assert ((half > 0) == (expected > 0)).float().mean().item() >= BF16_MASK_AGREEMENT


def _crops_dataset(root: Path) -> Path:
    cases = root / "cases.json"
    cases.write_text(
        json.dumps(
            [
                {"image": str(REPO / "tests/data" / f"{c}_image.nrrd"), "label": str(REPO / "tests/data" / f"{c}_label.nrrd"),
                 "modality": m}
                for c, m in (("lung1_crop", "ct"), ("breast1_crop", "mr"))
            ]
        )
    )  # fmt: skip
    data = root / "data"
    command = [PYTHON, "scripts/prepare_sa_med2d.py", "--datalist", str(cases), "--dataset", "Crops"]
    command += ["--split", "0.5", "0.5", "0", "--output", str(data), "--quiet"]
    subprocess.run(command, cwd=REPO, env=ENV, check=True, capture_output=True)
    return data


def _volumes_datalist(root: Path) -> Path:
    volumes = root / "volumes.json"
    image, label = (str(REPO / "tests/data" / f"lung1_crop_{kind}.nrrd") for kind in ("image", "label"))
    volumes.write_text(json.dumps([{"image": image, "label": label, "modality": "ct"}]))
    return volumes


#: every training config users run (multi_gpu_train.json: the NCCL test below)
TRAINING_CONFIGS = {
    "lite": ["configs/train.json"],
    "vit_b": ["configs/train.json", "configs/vit_b.json"],
    "volumes": ["configs/train.json", "configs/train_volumes.json"],
    "auto": ["configs/train.json", "configs/train_auto.json"],
}


@pytest.mark.parametrize("name", list(TRAINING_CONFIGS))
def test_one_amp_training_step_of_each_training_config(name, tmp_path):
    """One iteration on CUDA with AMP (bf16 autocast where supported): finite loss, the trainable weights move."""
    from monai.bundle import ConfigWorkflow

    configs = TRAINING_CONFIGS[name]
    overrides = dict(ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"))
    overrides.update(batch_size=1, max_epochs=1, epoch_length=1, num_workers=0, val_interval=100)
    overrides.update(amp=True, device="$torch.device('cuda')")
    if name == "auto":
        overrides["dataset_dir"] = str(REPO / "tests/data/hc18_small")
    else:
        overrides.update(masks_per_image=2, interactive_iterations=2, cache="none")
        overrides["dataset_dir"] = str(_crops_dataset(tmp_path))
    if name == "volumes":
        overrides["train_volumes"] = overrides["val_volumes"] = str(_volumes_datalist(tmp_path))
    if name == "vit_b":
        overrides["weights"] = ""  # no SAM ViT-B file here: random frozen encoder, the step is what is checked
    workflow = ConfigWorkflow(config_file=[str(REPO / c) for c in configs], workflow_type="train", **overrides)
    workflow.initialize()
    trainer = workflow.trainer
    before = {k: v.detach().clone() for k, v in trainer.network.named_parameters() if v.requires_grad}
    workflow.run()
    loss = float(trainer.state.output[0]["loss"])
    assert np.isfinite(loss)
    after = dict(trainer.network.named_parameters())
    assert any(not torch.equal(before[k], after[k].detach()) for k in before)
    workflow.finalize()


def _infer(tmp_path: Path, device: str, *configs: str) -> np.ndarray:
    from bundle.io import load_image

    out = tmp_path / device
    files = "[" + ",".join(f"'{c}'" for c in ("configs/inference.json", *configs)) + "]"
    command = [PYTHON, "-m", "monai.bundle", "run", "--config_file", files, "--input_image", str(LUNG)]
    command += ["--modality", "ct", "--box", json.dumps(BOX), "--output_dir", str(out)]
    command += ["--device", f"$torch.device('{device}')"]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.asarray(load_image(str(next(out.glob("*_seg.nii.gz")))))[0] > 0


def test_inferer_on_cuda_writes_the_cpu_mask(tmp_path):
    cpu, gpu = _infer(tmp_path, "cpu"), _infer(tmp_path, "cuda")
    assert cpu.any() and (cpu == gpu).mean() >= 0.999


def test_tensorrt_config_writes_the_pytorch_mask(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed on this GPU machine")
    pytest.importorskip("polygraphy", reason="polygraphy is not installed on this GPU machine")
    eager = _infer(tmp_path, "cuda")
    trt = _infer(tmp_path / "trt", "cuda", "configs/inference_trt.json")
    assert (eager == trt).mean() >= 0.999


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs; this machine has fewer")
def test_torchrun_over_nccl_trains_two_ranks(tmp_path):
    data = _crops_dataset(tmp_path)
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "monai.bundle"]
    command += ["run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']"]
    command += ["--dataset_dir", str(data), "--ckpt_dir", str(tmp_path / "models")]
    command += ["--output_dir", str(tmp_path / "eval")]
    command += ["--batch_size", "1", "--masks_per_image", "1", "--interactive_iterations", "1", "--max_epochs", "1"]
    command += ["--epoch_length", "2", "--num_workers", "0", "--cache", "none"]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "models" / "checkpoint_final.pt").is_file()
