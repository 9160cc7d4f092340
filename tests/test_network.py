"""SAMUNet: architecture numbers, fidelity to segment_anything, gradients, prompts and input validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT

from bundle.networks import SAMUNet


def count(module, trainable):
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return SAMUNet("vit_tiny", conv_branch="resnet18").eval()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.randn(2, 3, 256, 256)


def test_vit_b_resnet34_parameter_counts():
    net = SAMUNet("vit_b", conv_branch="resnet34")
    assert count(net, trainable=False) == 86_672_640
    assert count(net, trainable=True) == 29_347_244
    assert count(net.image_encoder, trainable=True) == 0
    assert sum(p.numel() for p in net.prompt_encoder.parameters()) == 6_220
    assert sum(p.numel() for p in net.mask_decoder.parameters()) == 3_542_368
    assert sum(p.numel() for p in net.adapters_bridge.parameters()) == 2_460_000
    assert sum(p.numel() for p in net.embedding_encoder.parameters()) == 73_952
    assert sum(p.numel() for p in net.conv_branch.parameters()) == 21_284_672
    assert sum(p.numel() for p in net.adapters_in.parameters()) == 1_980_032


def test_vit_b_resnet50_parameter_count():
    # the paper's reference code counts 51.76M trainable for the ResNet50 model; we count 51,755,564.
    net = SAMUNet("vit_b", conv_branch="resnet50")
    assert count(net, trainable=True) == 51_755_564
    assert round(count(net, trainable=True) / 1e6, 2) == 51.76


def _expected_vit_256_state(sam_state):
    """The 1024 -> 256 conversion written out independently: bilinear pos_embed 64->16, global rel_pos 127->31."""
    out = {}
    for key, value in sam_state.items():
        if not key.startswith("image_encoder."):
            continue
        key = key[len("image_encoder.") :]
        if key == "pos_embed":
            value = F.interpolate(
                value.permute(0, 3, 1, 2), size=(16, 16), mode="bilinear", align_corners=False
            ).permute(0, 2, 3, 1)
        elif "rel_pos" in key and value.shape[0] == 127:
            value = F.interpolate(value[None, None], size=(31, value.shape[1]), mode="bilinear", align_corners=False)[
                0, 0
            ]
        out[key] = value
    return out


def test_official_sam_vit_b_fidelity(tmp_path):
    """Conv branch and fusion off + official SAM ViT-B weights: the embedding equals segment_anything's encoder."""
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    with torch.no_grad():  # the official file has non-zero relative positions; random ones make the check meaningful
        for name, param in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                param.normal_(0, 0.02)
    sam_state = sam.state_dict()
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam_state, path)

    net = SAMUNet("vit_b", conv_branch="none", fusion=False, weights=str(path)).eval()
    reference = ImageEncoderViT(
        img_size=256,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4,
        out_chans=256,
        qkv_bias=True,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
    ).eval()
    reference.load_state_dict(_expected_vit_256_state(sam_state))

    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ours = net.encode(x)["embedding"]
        theirs = reference(x)
    assert ours.shape == (1, 256, 16, 16)
    assert (ours - theirs).abs().max().item() <= 1e-5
    # the prompt encoder and the decoder's transformer came from the same file
    assert torch.equal(net.prompt_encoder.point_embeddings[2].weight, sam.prompt_encoder.point_embeddings[2].weight)
    assert torch.equal(
        net.mask_decoder.transformer.final_attn_token_to_image.q_proj.weight,
        sam.mask_decoder.transformer.final_attn_token_to_image.q_proj.weight,
    )


def test_official_sam_load_report_names_keys(tmp_path):
    from bundle.networks.weights import load_weights

    sam = sam_model_registry["vit_b"]()
    path = tmp_path / "sam.pth"
    torch.save(sam.state_dict(), path)
    net = SAMUNet("vit_b", conv_branch="resnet34")
    report = load_weights(net, path)
    assert report.source_format == "sam"
    assert "mask_decoder.iou_prediction_head.layers.0.weight" in report.dropped
    assert "mask_decoder.mask_tokens.weight" in report.dropped
    assert "mask_decoder.med_token.weight" in report.missing
    assert "conv_branch.conv1.weight" in report.missing
    assert not any(k.startswith("image_encoder.") for k in report.missing)
    assert "unused" in report.summary() and "kept as initialised" in report.summary()


def test_gradients_reach_trainable_parts_only():
    torch.manual_seed(0)
    net = SAMUNet("vit_tiny", conv_branch="resnet18").train()
    image = torch.randn(2, 3, 256, 256)
    features = net.encode(image)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [50.0, 50.0, 200.0, 180.0]])
    points = torch.tensor([[[30.0, 40.0], [90.0, 100.0], [0.0, 0.0]], [[60.0, 60.0], [150.0, 150.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -1], [1, 0, -1]])
    with_mask = net.decode(
        features, boxes=boxes, points=points, point_labels=labels, mask_inputs=torch.randn(2, 1, 64, 64)
    )
    without_mask = net.decode(features, boxes=boxes)
    (with_mask.mean() + without_mask.mean()).backward()
    assert all(p.grad is None for p in net.image_encoder.parameters())
    for part in (
        "conv_branch",
        "adapters_in",
        "adapters_bridge",
        "embedding_encoder",
        "prompt_encoder",
        "mask_decoder",
    ):
        for name, param in getattr(net, part).named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{part}.{name} has no gradient"


def test_frozen_encoder_stays_in_eval_mode(small_net):
    small_net.train()
    assert small_net.training and not small_net.image_encoder.training
    small_net.eval()


def test_forward_equals_encode_decode_and_default_box(small_net, image):
    with torch.no_grad():
        whole = small_net(image)
        box = torch.tensor([[0.0, 0.0, 255.0, 255.0]] * 2)
        explicit = small_net.decode(small_net.encode(image), boxes=box)
    assert whole.shape == (2, 1, 256, 256)
    assert torch.allclose(whole, explicit, atol=1e-6)


def test_several_prompts_per_image(small_net, image):
    boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0], [100.0, 100.0, 200.0, 220.0], [30.0, 40.0, 90.0, 80.0]])
    with torch.no_grad():
        features = small_net.encode(image)
        many = small_net.decode(features, boxes=boxes, image_index=torch.tensor([0, 0, 1]))
        single = small_net(image[1:], boxes=boxes[2:])
        low = small_net.decode_low_res(features, boxes=boxes, image_index=torch.tensor([0, 0, 1]))
    assert many.shape == (3, 1, 256, 256)
    assert low.shape == (3, 1, 64, 64)
    assert torch.allclose(many[2:], single, atol=1e-5)
    assert not torch.allclose(many[0], many[1])  # different boxes on one image give different masks


def test_points_only_and_mask_feedback(small_net, image):
    points = torch.tensor([[[40.0, 50.0]], [[120.0, 130.0]]])
    labels = torch.ones(2, 1)
    with torch.no_grad():
        features = small_net.encode(image)
        first = small_net.decode_low_res(features, points=points, point_labels=labels)
        second = small_net.decode_low_res(features, points=points, point_labels=labels, mask_inputs=first)
    assert first.shape == second.shape == (2, 1, 64, 64)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": torch.randn(1, 1, 256, 256)}, "3 channels"),
        ({"image": torch.randn(1, 3, 128, 256)}, "256x256"),
        ({"image": torch.randn(3, 256, 256)}, "[B, 3, 256, 256]"),
        ({"boxes": torch.tensor([[100.0, 10.0, 50.0, 60.0]])}, "x0 <= x1"),
        ({"boxes": torch.tensor([[10.0, 10.0, 300.0, 60.0]])}, "inside the 256x256"),
        ({"boxes": torch.tensor([[10.0, 10.0, 60.0]])}, "[N, 4]"),
        ({"points": torch.tensor([[[10.0, 10.0]]])}, "without point_labels"),
        ({"points": torch.tensor([[[10.0, 10.0]]]), "point_labels": torch.tensor([[2]])}, "1 (foreground)"),
        ({"points": torch.tensor([[[10.0, 900.0]]]), "point_labels": torch.tensor([[1]])}, "inside the 256x256"),
        ({"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]] * 2)}, "2 prompts for 1 images"),
        (
            {
                "boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]),
                "points": torch.zeros(2, 1, 2),
                "point_labels": torch.ones(2, 1),
            },
            "prompt batch sizes differ",
        ),
        ({"mask_inputs": torch.zeros(1, 1, 32, 32)}, "mask_inputs must be"),
    ],
)
def test_bad_input_is_a_clear_value_error(small_net, kwargs, message):
    kwargs = dict(kwargs)
    image = kwargs.pop("image", torch.randn(1, 3, 256, 256))
    with pytest.raises(ValueError) as error:
        small_net(image, **kwargs)
    assert message in str(error.value)
