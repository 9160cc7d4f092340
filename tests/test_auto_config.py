"""The prompt-free (automatic) mode: configs/inference_auto.json as MONAI's tools and MONAI Label's stock bundle
task see it, and as users run it on 2D images and volumes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.transforms import LoadImage
from PIL import Image

from bundle.networks import SAMUNet, make_contract
from bundle.transforms import FromNetworkFrame

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "inference_auto.json"
META = REPO / "configs" / "metadata.json"
VOLUME = REPO / "tests" / "data" / "lung1_crop_image.nrrd"


def task_network(seed: int = 0) -> SAMUNet:
    """A small untrained task network (the machinery is checked, not the weights)."""
    torch.manual_seed(seed)
    return SAMUNet("vit_tiny", conv_branch="none", fusion=False, decoder_tokens="sam", pixel_normalization="litemedsam")


@pytest.fixture(scope="module")
def task_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("task") / "model.pt"
    network = task_network()
    torch.save({"model": network.state_dict(), "network": make_contract(network)}, path)
    return path


def write_png(path: Path, hw=(256, 180), seed: int = 0) -> np.ndarray:
    """A grey photo-like PNG (rows x columns ``hw``) with a bright disc; returns the pixels as displayed."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: hw[0], : hw[1]]
    pixels = 60 + 30 * rng.random(hw)
    pixels[(rows - hw[0] * 0.45) ** 2 + (cols - hw[1] * 0.55) ** 2 < (min(hw) * 0.25) ** 2] += 120
    pixels = pixels.clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def workflow(**overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=str(CONFIG), meta_file=str(META), workflow_type="infer", bundle_root=str(REPO), **overrides
    )
    wf.initialize()
    return wf


def test_monai_properties_of_the_infer_workflow():
    """MONAI's property check of the infer workflow (``verify_net_in_out``: tests/test_bundle.py)."""
    assert workflow().check_properties() == []


def test_cuda_is_the_device_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    wf = workflow()
    assert wf.parser.get_parsed_content("device") == torch.device("cuda")
    inferer = wf.parser.get_parsed_content("inferer")
    assert inferer.sw_device == torch.device("cuda") and inferer.device is None  # adaptive stitching
    assert wf.parser.get_parsed_content("amp") is True


def test_2d_image_that_fits_one_window_equals_the_whole_image_path(tmp_path, task_checkpoint):
    pixels = write_png(tmp_path / "photo.png", hw=(256, 180))
    wf = workflow(
        ckpt_path=str(task_checkpoint),
        input_image=str(tmp_path / "photo.png"),
        modality="ultrasound",
        output_dir=str(tmp_path / "out"),
        output_ext=".png",
    )
    wf.run()
    written = np.asarray(Image.open(tmp_path / "out" / "photo_seg.png"))
    assert written.shape == pixels.shape and set(np.unique(written)) <= {0, 255}

    network = task_network().eval()
    with torch.no_grad():
        image = torch.as_tensor(pixels, dtype=torch.float32)[None, None]
        frame = network(network.preprocess(image))
        whole = FromNetworkFrame(256)(frame[0], pixels.shape)[0] > 0
    np.testing.assert_array_equal(written > 0, np.asarray(whole))
    assert 0 < whole.sum() < whole.numel()  # an untrained network: some pixels on, some off


def test_volume_is_segmented_slice_by_slice_with_its_geometry(tmp_path, task_checkpoint):
    wf = workflow(
        ckpt_path=str(task_checkpoint), input_image=str(VOLUME), modality="ct", output_dir=str(tmp_path / "out")
    )
    wf.run()
    load = LoadImage(image_only=True)
    written, source = load(tmp_path / "out" / "lung1_crop_image_seg.nii.gz"), load(VOLUME)
    assert written.shape == source.shape == (96, 96, 8)
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(written))) <= {0, 1}


def test_a_chosen_spacing_is_inverted_back_to_the_input_grid(tmp_path, task_checkpoint):
    pixels = write_png(tmp_path / "large.png", hw=(600, 450), seed=1)
    wf = workflow(
        ckpt_path=str(task_checkpoint),
        input_image=str(tmp_path / "large.png"),
        modality="ultrasound",
        spacing=[2.0, 2.0],
        output_dir=str(tmp_path / "out"),
    )
    wf.run()
    written = LoadImage(image_only=True)(tmp_path / "out" / "large_seg.nii.gz")
    assert tuple(written.shape) == pixels.shape[::-1]  # MONAI's x-first array of the 600 x 450 image


def test_no_task_model_is_a_clear_error_and_writes_nothing(tmp_path):
    write_png(tmp_path / "photo.png")
    wf = workflow(
        ckpt_path=str(tmp_path / "missing.pt"),
        input_image=str(tmp_path / "photo.png"),
        modality="ultrasound",
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(Exception) as error:
        wf.run()
    assert "missing.pt" in "".join(str(e) for e in _chain(error.value))
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception) as error:
        workflow(ckpt_path=str(tmp_path / "missing.pt")).run()
    assert "nothing to segment" in "".join(str(e) for e in _chain(error.value))


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_monai_label_stock_bundle_task_serves_it(tmp_path, task_checkpoint):
    """MONAI Label's own BundleInferTask (the monaibundle app's task), pointed at inference_auto.json, segments a
    2D image as the CLI does."""
    pytest.importorskip("monailabel")
    from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

    class AutoConfig(BundleConstants):
        def configs(self):
            return ["inference_auto.json"]

    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    os.symlink(REPO / "configs", root / "configs")
    os.symlink(task_checkpoint, root / "models" / "model.pt")
    write_png(tmp_path / "photo.png", hw=(300, 420), seed=2)
    task = BundleInferTask(str(root), conf={}, const=AutoConfig(), type="segmentation")
    assert task.is_valid()
    task.bundle_config["modality"] = "ultrasound"  # a deployment's own setting (requests carry no config ids)
    label_file, result = task({"image": str(tmp_path / "photo.png"), "device": "cpu", "result_extension": ".nii.gz"})
    served = np.asarray(LoadImage(image_only=True)(label_file)) > 0

    wf = workflow(
        ckpt_path=str(task_checkpoint),
        input_image=str(tmp_path / "photo.png"),
        modality="ultrasound",
        output_dir=str(tmp_path / "cli"),
    )
    wf.run()
    cli = np.asarray(LoadImage(image_only=True)(tmp_path / "cli" / "photo_seg.nii.gz")) > 0
    np.testing.assert_array_equal(served.squeeze(), cli)
