"""Checkpoint formats: the bundle's own, reference SAM-UNet, torchvision ResNet; safe loading and clear errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from bundle.networks import SAMUNet, load_weights, read_state_dict

ROOT = Path(__file__).resolve().parents[1]


def to_reference_layout(state):
    """Re-key a bundle state dict the way the reference SAM-UNet code names its modules (image_encoder.sam_img_encoder.*, resnet.stage*, ...)."""
    rules = [
        (r"^image_encoder\.", "image_encoder.sam_img_encoder."),
        (r"^prompt_encoder\.", "prompt_encoder.sam_prompt_encoder."),
        (r"^mask_decoder\.(transformer|output_upscaling)\.", r"mask_decoder.sam_mask_decoder.\1."),
        (r"^conv_branch\.conv1\.", "resnet.stage0.0."),
        (r"^conv_branch\.bn1\.", "resnet.stage0.1."),
        (r"^conv_branch\.layer([1-4])\.", r"resnet.stage\1."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value
    # the reference wraps SAM's whole decoder, so its unused heads are in the file too
    out["mask_decoder.sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    out["mask_decoder.sam_mask_decoder.mask_tokens.weight"] = torch.zeros(4, 256)
    out["mask_decoder.sam_mask_decoder.iou_prediction_head.layers.0.weight"] = torch.zeros(256, 256)
    return out


@pytest.fixture(scope="module")
def trained_like():
    torch.manual_seed(3)
    net = SAMUNet("vit_tiny", conv_branch="resnet18").eval()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return net


def outputs(net, seed=0):
    torch.manual_seed(seed)
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        return net.eval()(image, boxes=torch.tensor([[20.0, 30.0, 180.0, 200.0]]))


def test_reference_sam_unet_checkpoint_loads_every_key(tmp_path, trained_like):
    path = tmp_path / "sam_unet_reference.pth"
    torch.save({"model": to_reference_layout(trained_like.state_dict())}, path)
    fresh = SAMUNet("vit_tiny", conv_branch="resnet18")
    report = load_weights(fresh, path)
    assert report.source_format == "sam_unet_reference"
    assert report.missing == []
    assert "mask_decoder.sam_mask_decoder.iou_token.weight" in report.dropped
    assert torch.equal(outputs(fresh), outputs(trained_like))


def test_reference_checkpoint_with_pickled_optimizer_is_rejected_then_converted(tmp_path, trained_like):
    path = tmp_path / "reference_with_optimizer.pth"
    optimizer = torch.optim.Adam([p for p in trained_like.parameters() if p.requires_grad], lr=1e-4)
    torch.save({"model": to_reference_layout(trained_like.state_dict()), "optimizer": optimizer}, path)
    with pytest.raises(ValueError, match=r"pickled Python object \(torch.optim.adam.Adam\)") as error:
        read_state_dict(path)
    assert str(path) in str(error.value) and "--trust-pickle" in str(error.value)

    converted = tmp_path / "converted.pt"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/convert_checkpoint.py"),
            str(path),
            str(converted),
            "--trust-pickle",
            "--backbone",
            "vit_tiny",
            "--conv-branch",
            "resnet18",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "format sam_unet_reference" in run.stdout
    fresh = SAMUNet("vit_tiny", conv_branch="resnet18", weights=str(converted))
    assert torch.equal(outputs(fresh), outputs(trained_like))


def test_torchvision_resnet_loads_into_conv_branch(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet34(weights=None).eval()
    path = tmp_path / "resnet34.pth"
    torch.save(resnet.state_dict(), path)
    net = SAMUNet("vit_tiny", conv_branch="resnet34").eval()
    report = load_weights(net, path)
    assert report.source_format == "torchvision_resnet"
    assert report.dropped == ["fc.bias", "fc.weight"]
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        stages = net.conv_branch(x)
        y = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        for layer, ours in zip((resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4), stages):
            y = layer(y)
            assert torch.allclose(ours, y, atol=1e-5)
    assert [s.shape[-1] for s in stages] == [64, 32, 16, 8]


def test_bundle_checkpoint_round_trip(tmp_path, trained_like):
    path = tmp_path / "model.pt"
    torch.save({"model": trained_like.state_dict()}, path)
    fresh = SAMUNet("vit_tiny", conv_branch="resnet18", weights=str(path))
    assert torch.equal(outputs(fresh), outputs(trained_like))


def test_checkpoint_of_wrong_architecture(tmp_path, trained_like):
    path = tmp_path / "model.pt"
    torch.save({"model": trained_like.state_dict()}, path)
    with pytest.raises(ValueError, match="does not match this SAMUNet configuration") as error:
        SAMUNet("vit_tiny", conv_branch="resnet50", weights=str(path))
    assert str(path) in str(error.value) and "shape" in str(error.value)
    without_fusion = {k: v for k, v in trained_like.state_dict().items() if "bridge" not in k}
    torch.save({"model": without_fusion}, path)
    with pytest.raises(ValueError, match="lacks .* keys"):
        SAMUNet("vit_tiny", conv_branch="resnet18", weights=str(path))
    torch.save({"model": {"unrelated.weight": torch.zeros(3)}}, path)
    with pytest.raises(ValueError, match="unexpected keys"):
        SAMUNet("vit_tiny", conv_branch="resnet18", weights=str(path))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        read_state_dict(corrupt)
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(ValueError, match="random.pt is not a readable PyTorch checkpoint") as error:
        read_state_dict(random_bytes)
    assert "trust" not in str(error.value)  # no nudge towards unsafe unpickling for a file that is no pickle
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="does not contain a state dict"):
        read_state_dict(not_a_dict)


def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path, trained_like):
    state = trained_like.state_dict()
    names = [k for k, v in state.items() if v.is_floating_point()][:2]
    state[names[0]] = state[names[0]].clone().fill_(float("nan"))
    state[names[1]] = state[names[1]].clone().fill_(float("inf"))
    path = tmp_path / "diverged.pt"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"diverged.pt: 2 weight tensor\(s\) hold NaN or Inf") as error:
        SAMUNet("vit_tiny", conv_branch="resnet18", weights=str(path))
    assert f"({names[0]}, {names[1]})" in str(error.value)


def test_convert_checkpoint_reports_unreadable_files_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 4)
    for extra in ([], ["--trust-pickle"]):
        run = subprocess.run(
            [sys.executable, str(ROOT / "scripts/convert_checkpoint.py"), str(garbage), str(tmp_path / "o.pt"), *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip() == f"error: {garbage} is not a readable PyTorch checkpoint" + (
            " (UnpicklingError)" if extra else " (torch.load cannot parse it)"
        )
        assert not (tmp_path / "o.pt").exists()
