"""Sliding-window inference: equal to the whole-image path where one window suffices, volumes slice by slice, and a
box over the windows it covers (with_coord) on a constructed image with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from constructed import BrightObjectNet

from bundle.inferers import BACKGROUND_LOGIT, BoxWindowInferer, SlidingWindowSliceInferer
from bundle.networks import SAMUNet
from bundle.transforms import FromNetworkFrame, scale_box_to_frame


@pytest.fixture(scope="module", params=["litemedsam", "sam"])
def small_net(request):
    torch.manual_seed(0)
    return SAMUNet("vit_tiny", conv_branch="resnet18", pixel_normalization=request.param).eval()


def whole_image_logits(network, image: torch.Tensor, **prompts) -> torch.Tensor:
    """The whole-image path: ``image [1, C, H, W]`` in [0, 255] -> network frame -> logits ``[1, H, W]``."""
    frame = network(network.preprocess(image), **prompts)
    return torch.as_tensor(FromNetworkFrame(network.image_size)(frame[0], tuple(image.shape[-2:])))


@pytest.mark.parametrize("hw", [(256, 180), (143, 256), (256, 256)])
@torch.no_grad()
def test_one_window_equals_the_whole_image_path(small_net, hw):
    torch.manual_seed(1)
    image = torch.rand(1, 3, *hw) * 255
    inferer = SlidingWindowSliceInferer((256, 256), sw_batch_size=2, overlap=0.25, mode="gaussian")
    windowed = inferer(small_net.scale_pixels(image), small_net)
    assert windowed.shape == (1, 1, *hw)
    torch.testing.assert_close(windowed[0], whole_image_logits(small_net, image), atol=1e-5, rtol=0)


@torch.no_grad()
def test_volume_runs_slice_by_slice_as_2d_images(small_net):
    torch.manual_seed(2)
    volume = torch.rand(1, 3, 300, 200, 3) * 255
    pixels = torch.stack([small_net.scale_pixels(volume[..., k]) for k in range(3)], dim=-1)
    inferer = SlidingWindowSliceInferer((256, 256), sw_batch_size=3, overlap=0.5, mode="gaussian", spatial_dim=2)
    out = inferer(pixels, small_net)
    assert out.shape == (1, 1, 300, 200, 3)
    for k in range(3):  # each slice: the 2D sliding window over that slice (two windows of 256 over 300 rows)
        torch.testing.assert_close(out[..., k], inferer(pixels[..., k], small_net), atol=1e-5, rtol=0)


def test_inputs_of_other_dimensions_are_refused(small_net):
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or volumes"):
        SlidingWindowSliceInferer()(torch.zeros(3, 256, 256), small_net)
    with pytest.raises(ValueError, match="roi_size must be 2D"):
        SlidingWindowSliceInferer(roi_size=(256, 256, 1))


def constructed_image() -> tuple[torch.Tensor, np.ndarray, list[float]]:
    """A 600 x 700 image: a bright object inside the box, a brighter one outside it; the answer is the first."""
    image = torch.full((1, 600, 700), 20.0)
    image[0, 100:400, 150:350] = 200.0
    image[0, 450:560, 480:650] = 230.0
    truth = np.zeros((600, 700), dtype=bool)
    truth[100:400, 150:350] = True
    return image, truth, [140.0, 90.0, 360.0, 410.0]


def test_box_windows_give_the_constructed_answer_at_native_resolution():
    image, truth, box = constructed_image()
    net = BrightObjectNet()
    inferer = BoxWindowInferer(net, overlap=0.25, mode="gaussian", sw_batch_size=3)
    logits = inferer(image, box)
    assert logits.shape == (600, 700)
    np.testing.assert_array_equal(logits.numpy() > 0, truth)
    # the region is the box plus 32 px of context: 304 x 284 pixels, 2 x 2 windows of 256 at overlap 0.25
    assert inferer.region(box, (600, 700)) == (58, 443, 108, 393)
    assert inferer.windows_run == 4
    assert (logits[:50] == BACKGROUND_LOGIT).all()  # outside every window


class RecordingNet(BrightObjectNet):
    """BrightObjectNet that records the box prompts it decodes."""

    def __init__(self) -> None:
        super().__init__()
        self.boxes: list[list[float]] = []

    def decode_low_res(self, features, boxes=None, **prompts):
        self.boxes += boxes.tolist()
        return super().decode_low_res(features, boxes=boxes, **prompts)


def test_each_window_gets_the_box_clipped_to_it():
    """A bright object outside the box but inside a window the box reaches must stay out: each window has to get
    the box shifted into its own coordinates and clipped to it (MONAI hands the predictor the window slices)."""
    image = torch.full((1, 300, 900), 10.0)
    image[0, 40:260, 100:330] = 220.0  # inside the box
    image[0, 40:260, 700:880] = 220.0  # outside the box, in the last window's reach
    truth = np.zeros((300, 900), dtype=bool)
    truth[40:260, 100:330] = True
    net = RecordingNet()
    inferer = BoxWindowInferer(net, overlap=0.5, context=0)
    logits = inferer(image, [90.0, 30.0, 650.0, 270.0])
    np.testing.assert_array_equal(logits.numpy() > 0, truth)
    boxes = np.array(net.boxes)
    assert len(boxes) == inferer.windows_run >= 4
    assert (boxes >= 0).all() and (boxes <= 255).all()
    assert (boxes[:, 2] == 255).any() and (boxes[:, 0] == 0).any()  # clipped on the right and on the left


def test_image_smaller_than_a_window_is_padded_at_the_end_as_the_frame():
    """A 256 x 180 image is one window: the box path equals the whole-image path of the same network exactly."""
    torch.manual_seed(3)
    net = SAMUNet("vit_tiny", conv_branch="resnet18", pixel_normalization="litemedsam").eval()
    image = torch.rand(3, 256, 180) * 255
    box = [30.0, 40.0, 150.0, 200.0]
    windowed = BoxWindowInferer(net)(image, box)
    with torch.no_grad():
        framed_box = torch.as_tensor(scale_box_to_frame(np.asarray(box), (256, 180)), dtype=torch.float32)[None]
        whole = whole_image_logits(net, image[None], boxes=framed_box)[0]
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=0)


def test_a_chosen_resolution_scales_the_box_with_the_image():
    image, truth, box = constructed_image()
    inferer = BoxWindowInferer(BrightObjectNet())
    logits = inferer(image, box, scale=0.5)
    assert logits.shape == (600, 700) and inferer.windows_run == 1  # the 150 x 100 px object fits one window
    pred = logits.numpy() > 0
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.98
    with pytest.raises(ValueError, match="scale must be > 0"):
        inferer(image, box, scale=0)


def test_volume_inferer_runs_a_box_over_windows_when_asked():
    """``PromptedSliceInferer(box_windows=1.0)``: a box-only prompt on a 2D image larger than a window is segmented
    at its own pixels (exactly the constructed answer); off by default (the frame path, at 256 / 700 resolution)."""
    from bundle.inferers import PromptedSliceInferer
    from bundle.inferers.volume_prompts import plan_prompts

    image, truth, box = constructed_image()
    volume = image[0].numpy()[..., None]  # [A, B, 1]: a 2D image, rows = a
    plan = plan_prompts((600, 700), box=[int(box[1]), int(box[0]), int(box[3]), int(box[2])])  # (a0, b0, a1, b1)
    windowed = PromptedSliceInferer(BrightObjectNet(), box_windows=1.0, min_contrast=0)
    mask, results = windowed.segment_volume(volume, plan)
    np.testing.assert_array_equal(mask[..., 0], truth)
    assert windowed.stats["encoded"] == 4 and results[0].area == truth.sum()
    framed, _ = PromptedSliceInferer(BrightObjectNet(), min_contrast=0).segment_volume(volume, plan)
    assert (framed[..., 0] != truth).sum() > 0  # resized to 256 and back: the edges move
    with pytest.raises(ValueError, match="box_windows must be a scale"):
        PromptedSliceInferer(BrightObjectNet(), box_windows=0)


def test_a_windowed_seed_slice_propagates_through_the_frame():
    """A slice box on the middle slice of a 3-slice volume: that slice over the windows, its neighbours propagated
    from its mask through the network frame (one frame encoding each, none for the seed slice)."""
    from bundle.inferers import PromptedSliceInferer
    from bundle.inferers.volume_prompts import plan_prompts

    image, truth, box = constructed_image()
    volume = np.repeat(image[0].numpy()[..., None], 3, axis=-1)  # [600, 700, 3]
    slice_box = [int(box[1]), int(box[0]), int(box[3]), int(box[2])]
    plan = plan_prompts(volume.shape, slice_box=slice_box, slice_index=1)
    inferer = PromptedSliceInferer(BrightObjectNet(), box_windows=1.0, min_contrast=0)
    mask, results = inferer.segment_volume(volume, plan)
    np.testing.assert_array_equal(mask[..., 1], truth)
    assert [r.index for r in results] == [0, 1, 2] and [r.propagated for r in results] == [True, False, True]
    for k in (0, 2):
        assert 2 * (mask[..., k] & truth).sum() / (mask[..., k].sum() + truth.sum()) > 0.97
    assert inferer.stats["encoded"] == 4 + 2
