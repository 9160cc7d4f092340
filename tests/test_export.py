"""Export: TorchScript through ckpt_export, ONNX encoder / decoder, ONNX Runtime inference, compiled encoders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.export import (
    ImageEncoderExport,
    OnnxSAMUNet,
    PromptDecoderExport,
    export_onnx,
    load_for_export,
    pack_prompts,
    trace_network,
    trt_compile_encoder,
)
from bundle.export.onnx_export import _max_difference
from bundle.networks import SAMUNet

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SMALL = ("vit_tiny", 128, "resnet18", True, "med")  # backbone, image_size, conv_branch, fusion, decoder_tokens
SMALL_OVERRIDES = [
    "--network_def#backbone",
    "vit_tiny",
    "--network_def#image_size",
    "128",
    "--network_def#conv_branch",
    "resnet18",
    "--network_def#fusion",
    "True",
    "--network_def#decoder_tokens",
    "med",
    "--weights",
    "",
]


def trained_like(*config) -> SAMUNet:
    """A network with every parameter random and non-zero (zero-initialised paths would hide a broken export)."""
    torch.manual_seed(0)
    net = SAMUNet(*config, None).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return net


def prompt_cases(n: int, size: int, mask_size: int):
    generator = torch.Generator().manual_seed(n)
    boxes = torch.tensor([[5.0, 8.0, size * 0.7, size * 0.8]]).expand(n, -1).clone()
    points = torch.rand(n, 3, 2, generator=generator) * (size - 1)
    labels = torch.tensor([[1, 0, -1]]).expand(n, -1).clone()
    masks = torch.randn(n, 1, mask_size, mask_size, generator=generator)
    return [
        {"boxes": boxes},
        {"points": points, "point_labels": labels},
        {"boxes": boxes, "points": points[:, :1], "point_labels": labels[:, :1], "mask_inputs": masks},
        {},
    ]


@pytest.mark.parametrize("config", [SMALL, ("vit_tiny", 128, "none", False, "sam")])
def test_export_modules_equal_the_network(config):
    """Same operations as SAMUNet (the encoder bit for bit); the decoder's sparse embedding computes the positional
    encoding of clicks and box corners in one matrix product, so it may differ in the last float bits."""
    net = trained_like(*config)
    image = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        features = net.encode(image)
        exported = ImageEncoderExport(net)(image)
        assert all(torch.equal(features[n], f) for n, f in zip(ImageEncoderExport(net).names, exported))
        for prompts in prompt_cases(2, 128, net.mask_input_size)[:3]:
            mask = prompts.get("mask_inputs")
            coords, labels = pack_prompts(prompts.get("boxes"), prompts.get("points"), prompts.get("point_labels"))
            has_mask = torch.ones(1) if mask is not None else torch.zeros(1)
            mask = mask if mask is not None else torch.zeros(2, 1, net.mask_input_size, net.mask_input_size)
            out = PromptDecoderExport(net)(*exported, coords, labels, mask, has_mask)
            assert (out - net.decode_low_res(features, **prompts)).abs().max().item() < 1e-5
    assert not net.training and not any(m.training for m in net.modules())


def test_pack_prompts_follows_sam_onnx_order():
    coords, labels = pack_prompts(
        torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[[9.0, 8.0]]]), torch.tensor([[0]])
    )
    assert coords.tolist() == [[[9.0, 8.0], [1.0, 2.0], [3.0, 4.0]]] and labels.tolist() == [[0.0, 2.0, 3.0]]
    coords, labels = pack_prompts(None, torch.tensor([[[9.0, 8.0]]]), torch.tensor([[1]]))
    assert labels.tolist() == [[1.0, -1.0]] and coords[0, 1].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        pack_prompts(None, None, None)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    net = trained_like(*SMALL)
    out = tmp_path_factory.mktemp("onnx")
    files = export_onnx(net, out, {"pixel_normalization": "sam", "bundle_name": "SAM-UNet"})
    return net, files


def test_onnx_runtime_equals_pytorch_for_any_batch_and_prompt(small_onnx):
    net, files = small_onnx
    runtime = OnnxSAMUNet(files["encoder.onnx"], files["decoder.onnx"], threads=1)
    assert runtime.image_size == 128 and runtime.mask_input_size == net.mask_input_size
    assert runtime.config == net.config and runtime.pixel_normalization == "sam"
    assert runtime.feature_names == ("embedding", "multi_scale")
    for batch in (1, 3):  # the export traced batch 2
        image = torch.rand(batch, 3, 128, 128)
        with torch.no_grad():
            reference = net.encode(image)
        features = runtime.encode(image)
        assert max((features[k] - reference[k]).abs().max().item() for k in reference) < 1e-4
        index = torch.tensor([batch - 1, 0, batch - 1, 0])
        for prompts in prompt_cases(4, 128, net.mask_input_size):
            prompts = {**prompts, "image_index": index} if prompts else {}
            with torch.no_grad():
                expected = net.decode(reference, **prompts)
            got = runtime.decode(features, **prompts)
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() < 1e-3
            assert ((got > 0) == (expected > 0)).float().mean().item() >= 0.999
    with pytest.raises(ValueError, match="boxes must lie inside"):
        runtime.decode(features, boxes=torch.tensor([[0.0, 0.0, 500.0, 10.0]]).expand(batch, -1))
    with pytest.raises(ValueError, match="image must be"):
        runtime.encode(torch.rand(1, 3, 64, 64))


def test_onnx_files_carry_metadata_and_refuse_mixed_pairs(small_onnx, tmp_path):
    import onnx

    net, files = small_onnx
    meta = {p.key: p.value for p in onnx.load(str(files["decoder.onnx"])).metadata_props}
    assert meta["part"] == "prompt_decoder" and json.loads(meta["network"]) == net.config
    assert json.loads(meta["inputs"]) == [
        "embedding",
        "multi_scale",
        "point_coords",
        "point_labels",
        "mask_input",
        "has_mask_input",
    ]
    assert meta["bundle_name"] == "SAM-UNet" and len(meta["weights_fingerprint"]) == 16
    other = trained_like(*SMALL)
    with torch.no_grad():
        other.mask_decoder.hf_mlp.layers[0].bias.add_(1.0)
    other_files = export_onnx(other, tmp_path)
    with pytest.raises(ValueError, match="different exports"):
        OnnxSAMUNet(files["encoder.onnx"], other_files["decoder.onnx"])
    with pytest.raises(ValueError, match="expected an image encoder"):
        OnnxSAMUNet(files["decoder.onnx"], files["decoder.onnx"])
    with pytest.raises(FileNotFoundError, match="scripts/export.py"):
        OnnxSAMUNet(tmp_path / "missing.onnx", files["decoder.onnx"])


def test_failed_onnx_check_writes_nothing(tmp_path):
    net = trained_like("vit_tiny", 128, "none", False, "sam")
    with pytest.raises(RuntimeError, match="nothing written"):
        export_onnx(net, tmp_path, atol=-1.0)  # no export can pass a negative tolerance
    assert list(tmp_path.iterdir()) == []


def test_a_trace_that_does_not_compute_what_the_module_does_is_refused():
    """The export's own trace check (torch's is off): a module whose output depends on how often it ran traces a
    constant that its next eager call does not give."""
    from bundle.export.torchscript import _trace

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    module, x = Counting(), torch.ones(2, 3)
    with pytest.raises(
        RuntimeError,
        match=r"traced Counting output 0 differs from the network.s: shape \(2, 3\) vs \(2, 3\), max \|difference\| 1",
    ):
        _trace(module, (x,), module(x))
    still = torch.nn.Linear(3, 2).eval()
    assert torch.equal(_trace(still, (x,), still(x))(x), still(x))


def test_tiny_vit_traces_with_any_batch(tmp_path):
    """TinyViT's own PatchMerging took the batch from len(x), which tracing froze; the backbone fixes that."""
    torch.manual_seed(0)
    net = SAMUNet("tiny_vit", 64, "none", False, "sam", None).eval()
    scripted = trace_network(net)
    files = export_onnx(net, tmp_path)
    runtime = OnnxSAMUNet(files["encoder.onnx"], files["decoder.onnx"], threads=1)
    for batch in (1, 3):
        image, boxes = torch.rand(batch, 3, 64, 64), torch.tensor([[4.0, 6.0, 50.0, 40.0]]).expand(batch, -1)
        with torch.no_grad():
            expected = net(image, boxes=boxes)
            assert (scripted(image, boxes) - expected).abs().max().item() < 1e-4
        assert (runtime(image, boxes=boxes) - expected).abs().max().item() < 1e-3


def test_load_for_export_is_strict_and_names_the_mismatch(tmp_path):
    small = trained_like(*SMALL)
    other = SAMUNet("vit_tiny", 128, "none", False, "med", None)
    torch.save({"model": small.state_dict()}, tmp_path / "small.pt")
    torch.save({"model": other.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not match the network to export .*conv_branch=none") as error:
        load_for_export(SAMUNet("vit_tiny", 128, "none", False, "med", None), tmp_path / "small.pt")
    assert "unexpected keys" in str(error.value)
    with pytest.raises(ValueError, match="does not match the network to export .*lacks 174"):
        load_for_export(SAMUNet(*SMALL, None), tmp_path / "other.pt")
    loaded = load_for_export(SAMUNet(*SMALL, None), tmp_path / "small.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), small.state_dict().values()))


def _ckpt_export(checkpoint: Path, target: Path, *overrides: str):
    command = [
        PYTHON,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "export_network",
        "--config_file",
        "configs/inference.json",
        "--ckpt_file",
        str(checkpoint),
        "--filepath",
        str(target),
        *overrides,
    ]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ckpt_export_torchscript_is_exact_and_refuses_a_mismatch(tmp_path):
    net = trained_like(*SMALL)
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    done = _ckpt_export(tmp_path / "model.pt", tmp_path / "model.ts", *SMALL_OVERRIDES)
    assert done.returncode == 0, done.stderr[-3000:]
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["name"] == "SAM-UNet"
    assert json.loads(extra["inference.json"])["export_network"]["_target_"] == "bundle.export.TorchScriptExport"
    for batch in (1, 3):
        image = torch.rand(batch, 3, 128, 128)
        prompts = prompt_cases(batch, 128, net.mask_input_size)[2]
        with torch.no_grad():
            boxes = prompts["boxes"]
            assert (scripted(image, boxes) - net(image, boxes=boxes)).abs().max().item() < 1e-4
            embedding, multi_scale = scripted.encode(image)
            coords, labels = pack_prompts(boxes, prompts["points"], prompts["point_labels"])
            low_res = scripted.decode(embedding, multi_scale, coords, labels, prompts["mask_inputs"], torch.ones(1))
            assert (low_res - net.decode_low_res(net.encode(image), **prompts)).abs().max().item() < 1e-4

    # a checkpoint of another configuration: a clear message and no file
    wrong = SAMUNet("vit_tiny", 128, "none", False, "med", None)
    torch.save({"model": wrong.state_dict()}, tmp_path / "wrong.pt")
    done = _ckpt_export(tmp_path / "wrong.pt", tmp_path / "wrong.ts", *SMALL_OVERRIDES)
    assert done.returncode != 0
    assert "does not match the network to export" in done.stderr and "lacks" in done.stderr
    assert not (tmp_path / "wrong.ts").exists()


def _export(*args: str):
    command = [PYTHON, "scripts/export.py", *args]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def test_non_finite_weights_are_refused_by_the_export_script_and_by_export_onnx(tmp_path):
    network = SAMUNet("vit_tiny", 128, "none", False, "med", None)
    state = network.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    path = tmp_path / "nan.pt"
    torch.save({"model": state, "network": network.contract()}, path)
    out = tmp_path / "models"
    done = _export("--checkpoint", str(path), "--output-dir", str(out))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"export stopped, nothing written: {path}: 1 weight tensor(s) hold NaN or Inf ({name})" in done.stderr
    assert not out.exists()
    network.load_state_dict(state)  # in memory, past the file check
    with pytest.raises(ValueError, match=f"network to export: 1 weight tensor.*{name}"):
        export_onnx(network, out)
    assert not out.exists()
    assert _max_difference(np.array([0.0, np.nan]), torch.zeros(2)) == float("inf")


def test_export_script_refuses_a_mismatched_checkpoint(tmp_path):
    """A checkpoint the configured network cannot take (train.json's SAM-UNet-Lite vs a vit_tiny file), and a
    model contract that contradicts an explicit override, both stop the export before anything is written."""
    wrong = SAMUNet("vit_tiny", 128, "none", False, "med", None)
    torch.save({"model": wrong.state_dict()}, tmp_path / "wrong.pt")
    torch.save({"model": wrong.state_dict(), "network": wrong.contract()}, tmp_path / "contract.pt")
    out = tmp_path / "models"
    done = _export(
        "--config", "configs/train.json", "--checkpoint", str(tmp_path / "wrong.pt"), "--output-dir", str(out)
    )
    assert done.returncode == 2
    assert "export stopped, nothing written" in done.stderr and "unexpected keys" in done.stderr
    done = _export(
        "--checkpoint", str(tmp_path / "contract.pt"), "--output-dir", str(out), "--network_def#backbone", "tiny_vit"
    )
    assert done.returncode == 2
    assert "backbone: checkpoint 'vit_tiny', config 'tiny_vit'" in done.stderr
    assert not out.exists() or list(out.iterdir()) == []


@pytest.fixture(scope="module")
def lite_onnx(tmp_path_factory):
    """The default network (real LiteMedSAM weights) exported by scripts/export.py, checked on real CT slices."""
    out = tmp_path_factory.mktemp("lite_onnx")
    done = subprocess.run(
        [PYTHON, "scripts/export.py", "--output-dir", str(out)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_exported_litemedsam_equals_pytorch_on_real_slices(lite_onnx, test_data_dir):
    sys.path.insert(0, str(REPO / "scripts"))
    from export import check_slices

    net = SAMUNet("tiny_vit", 256, "none", False, "sam", "litemedsam").eval()
    runtime = OnnxSAMUNet(lite_onnx / "encoder.onnx", lite_onnx / "decoder.onnx")
    assert runtime.pixel_normalization == "litemedsam"
    for case, modality in (("lung1_crop", "ct"), ("breast1_crop", "mr")):
        image = check_slices(test_data_dir / f"{case}_image.nrrd", modality, net, count=4)
        boxes = torch.tensor([[60.0, 70.0, 190.0, 200.0]]).expand(image.shape[0], -1)
        with torch.no_grad():
            expected = net(image, boxes=boxes)
        got = runtime(image, boxes=boxes)
        assert (got - expected).abs().max().item() < 1e-3
        assert ((got > 0) == (expected > 0)).float().mean().item() >= 0.999


def _infer(configs: str, out: Path, image: Path, box, *extra: str):
    command = [
        PYTHON,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        configs,
        "--input_image",
        str(image),
        "--modality",
        "ct",
        "--box",
        json.dumps(box),
        "--output_dir",
        str(out),
        *extra,
    ]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(out.glob("*_seg.nii.gz"))


@pytest.mark.slow
def test_onnx_inference_config_writes_the_pytorch_mask(lite_onnx, test_data_dir, shared_data_dir, tmp_path):
    import nibabel as nib

    image, box = shared_data_dir / "lung1_image.nrrd", [201, 342, 32, 234, 377, 34]  # the lung1 tumour with a margin
    onnx_mask = _infer(
        "['configs/inference.json','configs/inference_onnx.json']",
        tmp_path / "onnx",
        image,
        box,
        "--onnx_dir",
        str(lite_onnx),
    )
    torch_mask = _infer("configs/inference.json", tmp_path / "torch", image, box)
    a, b = nib.load(onnx_mask), nib.load(torch_mask)
    assert np.allclose(a.affine, b.affine) and a.shape == b.shape
    x, y = np.asarray(a.dataobj) > 0, np.asarray(b.dataobj) > 0
    assert y.sum() > 100  # the tumour is segmented
    assert (x == y).mean() >= 0.999 and (x & y).sum() / max(1, (x | y).sum()) >= 0.99


def test_trt_config_without_tensorrt_keeps_the_network_exact():
    """On a machine without CUDA / TensorRT, MONAI's trt_compile leaves the encoder in PyTorch: same outputs."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "inference.json"), str(REPO / "configs" / "inference_trt.json")])
    assert parser["trt_args"]["precision"] == "bf16" and "trt_compile_encoder" in parser["network"]
    net = trained_like(*SMALL)
    wrapped = trt_compile_encoder(net, str(REPO / "eval" / "unused_trt"))
    image, boxes = torch.rand(2, 3, 128, 128), torch.tensor([[4.0, 6.0, 90.0, 80.0]] * 2)
    with torch.no_grad():
        assert torch.equal(wrapped(image, boxes=boxes), net(image, boxes=boxes))


@pytest.mark.slow
def test_torch_compiled_encoder_is_exact_and_takes_meta_tensors():
    from monai.data import MetaTensor

    from bundle.export import torch_compile_encoder

    net = trained_like("vit_tiny", 128, "none", False, "sam")
    compiled = torch_compile_encoder(net)
    image, boxes = torch.rand(2, 3, 128, 128), torch.tensor([[4.0, 6.0, 90.0, 80.0]] * 2)
    with torch.no_grad():
        expected = net(image, boxes=boxes)
        got = compiled(MetaTensor(image), boxes=boxes)  # the inferer's preprocessing hands MetaTensors over
    assert (got - expected).abs().max().item() < 1e-4
    assert ((got > 0) == (expected > 0)).float().mean().item() >= 0.999
