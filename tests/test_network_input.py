"""NetworkInputd: a network's input made as its weights expect (the scheme the network names), the frame, exact
masks, and inversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from bundle.networks import PromptableNetworkMixin
from bundle.transforms import NetworkInputd
from bundle.transforms.intensity import SAM_PIXEL_MEAN, SAM_PIXEL_STD


class Network(PromptableNetworkMixin):
    """Only what NetworkInputd asks of a network: its scheme and input size."""

    def __init__(self, scheme: str, image_size: int = 256) -> None:
        self.pixel_normalization, self.image_size = scheme, image_size


@pytest.fixture
def item():
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.uniform(0, 255, (3, 45, 120)), dtype=torch.float32)
    label = torch.zeros(1, 45, 120)
    label[0, 10:30, 40:90] = 1
    return {"image": image, "label": label}


def test_sam_normalisation_then_zero_padding(item):
    out = NetworkInputd(["image", "label"], Network("sam"))(dict(item))
    image = out["image"]
    assert image.shape == (3, 256, 256)
    # 45x120 -> 96x256: rows 96.. are padding, zero after normalising (as SAM pads)
    assert torch.all(image[:, 96:] == 0)
    expected_first = (item["image"][0].mean() - SAM_PIXEL_MEAN[0]) / SAM_PIXEL_STD[0]
    assert abs(image[0, :96].mean().item() - expected_first.item()) < 0.05


def test_litemedsam_scaling_to_unit_range(item):
    out = NetworkInputd(["image", "label"], Network("litemedsam"))(dict(item))
    region = out["image"][:, :96]
    assert region.min().item() == pytest.approx(0.0) and region.max().item() == pytest.approx(1.0)
    assert torch.all(out["image"][:, 96:] == 0)


def test_mask_round_trip_is_exact(item):
    transform = NetworkInputd(["image", "label"], Network("litemedsam"))
    out = transform(dict(item))
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0}
    back = Invertd(keys="label", transform=transform, orig_keys="label", nearest_interp=False)(out)
    assert back["label"].shape == item["label"].shape
    assert torch.equal(torch.as_tensor(back["label"]) > 0.5, item["label"] > 0.5)


def test_unknown_normalisation_is_named():
    with pytest.raises(ValueError, match="'imagenet'"):
        NetworkInputd(["image"], Network("imagenet"))
