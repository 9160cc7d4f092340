"""The 256 network frame: resize longest side + pad bottom/right, its inverse, and prompt coordinates."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from scipy import ndimage

from bundle.transforms import (
    FromNetworkFrame,
    FromNetworkFramed,
    ToNetworkFrame,
    ToNetworkFramed,
    box_from_frame,
    box_from_mask,
    frame_shape,
    points_from_frame,
    scale_box_to_frame,
    scale_points_to_frame,
)


def blob_mask(h, w):
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - 0.45 * h) / (0.3 * h)) ** 2 + ((xx - 0.6 * w) / (0.25 * w)) ** 2 < 1
    mask[int(0.1 * h) : int(0.2 * h) + 2, 2:6] = True  # a second, small component
    return mask


@pytest.mark.parametrize(
    "hw,expected", [((512, 512), (256, 256)), ((512, 48), (256, 24)), ((45, 120), (96, 256)), ((255, 257), (254, 256))]
)
def test_frame_shape_matches_monai_resize(hw, expected):
    assert frame_shape(hw) == expected
    out = ToNetworkFrame()(torch.ones(1, *hw))
    assert tuple(out.shape) == (1, 256, 256)
    h, w = expected
    assert float(out[:, :h, :w].min()) > 0.99  # the image occupies the top-left frame_shape
    assert float(out[:, h:, :].abs().sum() + out[:, :, w:].abs().sum()) == 0  # zero padding bottom/right


@pytest.mark.parametrize("hw", [(512, 512), (45, 120), (300, 97)])
def test_mask_round_trip_same_voxels_up_to_border(hw):
    mask = blob_mask(*hw)
    frame = ToNetworkFrame(mode="nearest-exact")
    net = frame(MetaTensor(torch.as_tensor(mask[None], dtype=torch.float32)))
    back = frame.inverse(net)
    assert tuple(back.shape) == (1, *hw)
    restored = FromNetworkFrame(mode="nearest-exact")(net.as_tensor(), hw)
    assert torch.equal(restored, back.as_tensor())
    # disagreement only within the interpolation distance (one frame pixel) of the mask border
    to_border = np.where(mask, ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask))
    diff = (back[0].numpy() > 0.5) != mask
    assert to_border[diff].max(initial=0) <= max(hw) / 256 + 1
    assert diff.sum() <= 0.02 * mask.sum()


def test_dict_frame_records_size_and_inverts_with_invertd():
    image = MetaTensor(torch.rand(3, 120, 45))
    label = MetaTensor(torch.as_tensor(blob_mask(120, 45)[None], dtype=torch.float32))
    pre = Compose([ToNetworkFramed(["image", "label"], mode=("bilinear", "nearest-exact"))])
    d = pre({"image": image, "label": label})
    assert d["original_hw"] == (120, 45)
    assert d["image"].shape == (3, 256, 256) and set(torch.unique(d["label"]).tolist()) == {0.0, 1.0}
    d["pred"] = d["label"].clone()
    inverted = Invertd("pred", pre, orig_keys="image", nearest_interp=True)(d)
    assert tuple(inverted["pred"].shape) == (1, 120, 45)
    assert (inverted["pred"] != label).float().mean() < 0.05
    # the explicit inverse gives the same result as MONAI's traced one (Invertd's nearest_interp is "nearest")
    restored = FromNetworkFramed("pred", mode="nearest")({"pred": d["label"].as_tensor(), "original_hw": (120, 45)})
    assert torch.equal(restored["pred"], inverted["pred"].as_tensor())


def test_from_frame_rejects_other_sizes_and_mixed_grids():
    with pytest.raises(ValueError, match=r"expected \[C, 256, 256\]"):
        FromNetworkFrame()(torch.zeros(1, 64, 64), (100, 100))
    with pytest.raises(ValueError, match="different H, W"):
        ToNetworkFramed(["image", "label"])({"image": torch.zeros(1, 10, 12), "label": torch.zeros(1, 10, 13)})
    with pytest.raises(ValueError, match=r"expected a 2D channel-first \[C, H, W\]"):
        ToNetworkFrame()(torch.zeros(1, 4, 4, 4))
    # 64x64 low-res logits map back too
    assert tuple(FromNetworkFrame(size=64)(torch.zeros(1, 64, 64), (120, 45)).shape) == (1, 120, 45)


def test_coordinates_round_trip_and_follow_the_image():
    hw = (300, 97)
    mask = blob_mask(*hw)
    box = box_from_mask(mask)
    framed_mask = ToNetworkFrame(mode="nearest-exact")(torch.as_tensor(mask[None], dtype=torch.float32))
    framed_box = box_from_mask(framed_mask[0].numpy())
    # the scaled box lands on the box of the resized mask, within interpolation (one frame pixel + rounding)
    assert np.abs(scale_box_to_frame(box, hw) - framed_box).max() <= 1.5
    np.testing.assert_allclose(box_from_frame(scale_box_to_frame(box, hw), hw), box, atol=1e-9)
    points = np.array([[3, 250], [96, 0]])
    np.testing.assert_allclose(points_from_frame(scale_points_to_frame(points, hw), hw), points, atol=1e-9)
    t = scale_points_to_frame(torch.tensor([[[96.0, 299.0]]]), hw)
    assert isinstance(t, torch.Tensor) and t.shape == (1, 1, 2)
    h, w = frame_shape(hw)
    np.testing.assert_allclose(t[0, 0].numpy(), [96 * w / 97, 299 * h / 300], rtol=1e-6)
    with pytest.raises(ValueError, match="expected x, y"):
        scale_points_to_frame(np.zeros((2, 3)), hw)
