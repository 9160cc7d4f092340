"""Unit tests of bundle.inferers: embedding cache, prompt checks, slice frame, batching, propagation, OOM fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from constructed import BrightObjectNet

from bundle.inferers import EmbeddingCache, PromptedSliceInferer, SliceFrame, SlicePrompt, plan_prompts

SHAPE = (70, 110, 20)  # non-square slices catch axis swaps
CENTRE = np.array([30, 60, 10])


def sphere_volume(shape=SHAPE, centre=CENTRE, radius=12, z_factor=2.0):
    """A bright ellipsoid (values 200) on a dark background (20), slices along the last axis; and its mask."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    mask = np.sqrt((((grid - centre) * [1, 1, z_factor]) ** 2).sum(-1)) < radius
    return np.where(mask, 200.0, 20.0).astype(np.float32), mask


def slices_of(mask):
    return sorted(set(np.nonzero(mask)[2].tolist()))


# ------------------------------------------------------------------------------------------------------------- cache
def features(nbytes=256):
    return {"embedding": torch.zeros(nbytes // 16, 2, 2)}  # float32: 16 bytes per 2x2 map


def test_cache_lru_and_budget():
    cache = EmbeddingCache(max_bytes=3 * 256)
    for k in range(3):
        assert cache.put(("img", 2, k), features())
    assert cache.get(("img", 2, 0)) is not None  # 0 becomes most recent
    cache.put(("img", 2, 3), features())  # evicts the least recently used: 1
    assert ("img", 2, 1) not in cache and ("img", 2, 0) in cache and len(cache) == 3
    assert cache.nbytes == 3 * 256
    assert not cache.put(("img", 2, 9), features(4 * 256))  # larger than the whole budget: not stored
    assert cache.invalidate("img") == 3 and len(cache) == 0 and cache.nbytes == 0
    assert cache.hits == 1


def test_cache_max_items_and_disabled():
    cache = EmbeddingCache(max_items=2)
    for k in range(4):
        cache.put(("a", 0, k), features())
    assert len(cache) == 2 and ("a", 0, 3) in cache
    off = EmbeddingCache(max_bytes=0)
    assert not off.put(("a", 0, 0), features()) and len(off) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        EmbeddingCache(max_bytes=-1)


# ----------------------------------------------------------------------------------------------------------- prompts
def test_plan_box_and_slice_box():
    plan = plan_prompts(SHAPE, box=[1, 2, 3, 10, 20, 5])
    assert list(plan.seeds) == [3, 4, 5] and not plan.propagate and plan.axis == 2
    assert plan.seeds[4].box == (1, 2, 10, 20)
    plan = plan_prompts(SHAPE, box=[1, 2, 3, 10, 20, 5], axis=0)  # slices along i: in-plane (j, k)
    assert list(plan.seeds) == list(range(1, 11)) and plan.seeds[1].box == (2, 3, 20, 5)
    plan = plan_prompts(SHAPE, slice_box=[1, 2, 10, 20], slice_index=7)
    assert list(plan.seeds) == [7] and plan.propagate
    plan = plan_prompts(SHAPE, points=[[5, 6, 7], [8, 9, 7], [1, 1, 9]], point_labels=[1, 0, 1])
    assert plan.seeds[7].points == [(5, 6), (8, 9)] and plan.seeds[7].labels == [1, 0] and plan.seeds[9].labels == [1]
    plan = plan_prompts((40, 50), box=[1, 2, 30, 40])  # 2D image
    assert list(plan.seeds) == [0] and plan.seeds[0].box == (1, 2, 30, 40) and not plan.propagate


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"box": [0, 0, 0, 70, 10, 5]}, "outside the image: index i=70 not in \\[0, 69\\]"),
        ({"box": [-1, 0, 0, 10, 10, 5]}, "outside the image"),
        ({"box": [40, 10, 5, 20, 30, 8]}, "inverted along i"),
        ({"box": [1, 2, 3, 4]}, "4 values but the image is 3D"),
        ({"box": [1.5, 2, 3, 4, 5, 6]}, "integer voxel indices"),
        ({"slice_box": [1, 2, 10, 20]}, "must be given together"),
        ({"slice_box": [10, 2, 1, 20], "slice_index": 3}, "inverted"),
        ({"slice_box": [1, 2, 10, 200], "slice_index": 3}, "outside the slice"),
        ({"slice_box": [1, 2, 10, 20], "slice_index": 20}, "slice_index 20 lies outside"),
        ({"points": [[5, 5, 50]], "point_labels": [1]}, "click \\[5, 5, 50\\] lies outside the image"),
        ({"points": [[5, 5, 5]]}, "without point_labels"),
        ({"point_labels": [1]}, "without points"),
        ({"points": [[5, 5, 5]], "point_labels": [1, 0]}, "1 points but 2 point_labels"),
        ({"points": [[5, 5, 5]], "point_labels": [2]}, "1 \\(foreground\\) or 0"),
        ({"points": [[5, 5, 5]], "point_labels": [0]}, "only background clicks"),
        ({}, "no prompt given"),
        ({"box": [1, 2, 3, 10, 20, 5], "slice_box": [1, 2, 3, 4], "slice_index": 2}, "not both"),
        ({"box": [1, 2, 3, 10, 20, 5], "points": [[5, 5, 9]], "point_labels": [0]}, "outside the box's slice range"),
    ],
)
def test_plan_rejects_bad_prompts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_prompts(SHAPE, source="scan.nii.gz", **kwargs)


def test_plan_rejects_3d_prompts_on_2d_image():
    with pytest.raises(ValueError, match="3D box .* for a 2D image"):
        plan_prompts((40, 50), box=[1, 2, 0, 30, 40, 0], source="photo.png")
    with pytest.raises(ValueError, match="points\\[0\\] must have 2"):
        plan_prompts((40, 50), points=[[1, 2, 0]], point_labels=[1])


# ------------------------------------------------------------------------------------------------------------- frame
@pytest.mark.parametrize("transpose", [False, True])
def test_slice_frame_round_trip(transpose):
    frame = SliceFrame((70, 110), 256, transpose=transpose)
    image = torch.zeros(1, 3, 70, 110)
    image[..., 20:30, 50:60] = 1
    framed = BrightObjectNet().preprocess(frame.to_image(image) * 255)
    assert framed.shape == (1, 3, 256, 256)
    xyxy = frame.box_to_network((20, 50, 29, 59))
    ys, xs = np.nonzero(framed[0, 0].numpy() > 0.5)
    assert abs(xs.min() - xyxy[0]) <= 2 and abs(ys.min() - xyxy[1]) <= 2 and abs(xs.max() - xyxy[2]) <= 3
    back = frame.logits_to_slice(framed[:, :1] * 2 - 1)
    assert back.shape == (1, 70, 110)
    assert torch.equal(back[0] > 0, image[0, 0] > 0.5)


# ------------------------------------------------------------------------------------------------- volume inference
@pytest.fixture
def sphere():
    return sphere_volume()


@pytest.mark.parametrize("transpose", [False, True])
def test_box3d_lands_inside_box_and_other_slices_empty(sphere, transpose):
    volume, truth = sphere
    inferer = PromptedSliceInferer(BrightObjectNet(), batch_size=4, transpose_slices=transpose)
    box = [15, 45, 6, 45, 75, 14]
    mask, results = inferer.segment_volume(volume, plan_prompts(SHAPE, box=box))
    inside = np.zeros(SHAPE, bool)
    inside[15:46, 45:76, 6:15] = True
    assert mask.sum() > 0 and not (mask & ~inside).any()
    np.testing.assert_array_equal(mask, truth & inside)  # the constructed net is exact
    assert [r.index for r in results] == list(range(6, 15))
    assert inferer.network.encoded_images == 9 and inferer.network.encode_calls == 3  # batches of 4, 4, 1


def test_slice_box_propagates_and_stops_at_object_end(sphere):
    volume, truth = sphere
    inferer = PromptedSliceInferer(BrightObjectNet(), batch_size=3)
    mask, results = inferer.segment_volume(volume, plan_prompts(SHAPE, slice_box=[17, 47, 43, 73], slice_index=10))
    np.testing.assert_array_equal(mask, truth)
    lo, hi = slices_of(truth)[0], slices_of(truth)[-1]
    # the slices just past the object were tried, came out empty, and nothing beyond was prompted
    assert [r.index for r in results] == list(range(lo - 1, hi + 2))
    assert results[0].area == 0 and results[-1].area == 0 and all(r.propagated for r in results if r.index != 10)
    assert inferer.network.encoded_images < SHAPE[2]  # did not run over the whole volume


def test_clicks_prompt_their_slice_and_propagate(sphere):
    volume, truth = sphere
    inferer = PromptedSliceInferer(BrightObjectNet())
    plan = plan_prompts(SHAPE, points=[[30, 60, 10], [5, 5, 10]], point_labels=[1, 0])
    mask, results = inferer.segment_volume(volume, plan)
    np.testing.assert_array_equal(mask, truth)
    seed = next(r for r in results if r.index == 10)
    assert seed.points == [(30, 60), (5, 5)] and seed.labels == [1, 0] and not seed.propagated


def test_embedding_reused_for_extra_clicks(sphere):
    volume, truth = sphere
    net = BrightObjectNet()
    inferer = PromptedSliceInferer(net)
    inferer.segment_volume(volume, plan_prompts(SHAPE, box=[15, 45, 8, 45, 75, 12]), image_id="case")
    encoded = net.encoded_images
    mask = inferer.segment_slice(volume, 10, SlicePrompt(points=[(30, 60)], labels=[1]), image_id="case", axis=2)
    assert net.encoded_images == encoded  # no re-encoding: the click only ran the decoder
    np.testing.assert_array_equal(mask, truth[..., 10])
    inferer.segment_slice(volume, 3, SlicePrompt(points=[(30, 60)], labels=[1]), image_id="case", axis=2)
    assert net.encoded_images == encoded + 1
    # the cache holds plain tensors: MetaTensor metadata would be carried through every later decode
    cached = [inferer.cache.get(("case", 2, k)) for k in (3, 10)]
    assert all(type(t) is torch.Tensor for entry in cached for t in entry.values())


def test_seeds_on_two_slices_fill_the_gap(sphere):
    volume, truth = sphere
    inferer = PromptedSliceInferer(BrightObjectNet(), batch_size=2)
    plan = plan_prompts(SHAPE, points=[[30, 60, 7], [30, 60, 13]], point_labels=[1, 1])
    mask, _ = inferer.segment_volume(volume, plan)
    np.testing.assert_array_equal(mask, truth)


class OOMOnLargeBatch(BrightObjectNet):
    def encode(self, image):
        if image.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().encode(image)


def test_out_of_memory_retries_with_smaller_batch(sphere):
    volume, truth = sphere
    inferer = PromptedSliceInferer(OOMOnLargeBatch(), batch_size=8)
    mask, _ = inferer.segment_volume(volume, plan_prompts(SHAPE, box=[15, 45, 4, 45, 75, 16]))
    assert inferer.batch_size == 2
    np.testing.assert_array_equal(mask, truth & (np.arange(SHAPE[2]) >= 4) & (np.arange(SHAPE[2]) <= 16))


def test_out_of_memory_at_batch_one_is_raised(sphere):
    class AlwaysOOM(BrightObjectNet):
        def encode(self, image):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    inferer = PromptedSliceInferer(AlwaysOOM(), batch_size=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        inferer.segment_volume(sphere[0], plan_prompts(SHAPE, box=[15, 45, 4, 45, 75, 6]))


def test_other_runtime_errors_are_not_swallowed(sphere):
    class Broken(BrightObjectNet):
        def encode(self, image):
            raise RuntimeError("shape mismatch")

    inferer = PromptedSliceInferer(Broken(), batch_size=4)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        inferer.segment_volume(sphere[0], plan_prompts(SHAPE, box=[15, 45, 4, 45, 75, 6]))
    assert inferer.batch_size == 4


def test_real_samunet_configuration_runs_batched(sphere):
    """Any SAMUNet configuration goes through the same path (untrained vit_tiny: only shapes and caching)."""
    from bundle.networks import SAMUNet

    torch.manual_seed(0)
    net = SAMUNet("vit_tiny", conv_branch="resnet18")
    cache = EmbeddingCache()
    inferer = PromptedSliceInferer(net, batch_size=2, cache=cache)
    mask, results = inferer.segment_volume(sphere[0][..., :6], plan_prompts((70, 110, 6), box=[15, 45, 1, 45, 75, 4]))
    assert mask.shape == (70, 110, 6) and mask.dtype == bool and len(results) == 4
    assert not mask[..., [0, 5]].any()
    assert len(cache) == 4 and inferer.stats["encoded"] == 4
    # the MONAI Inferer interface: inferer(inputs, network) with no prompt
    out = inferer(torch.zeros(1, 3, 256, 256), net)
    assert out.shape == (1, 1, 256, 256)


def test_rejects_intensities_outside_0_255(sphere):
    """The inferer takes ModalityNormalize's [0, 255]; a [0, 1] volume (the MONAI Label server once sent one, which
    made propagation stop on its seed slice) or a raw one is refused, naming the range."""
    volume, _ = sphere
    inferer = PromptedSliceInferer(BrightObjectNet())
    plan = plan_prompts(volume.shape, slice_box=[15, 45, 45, 75], slice_index=10)
    with pytest.raises(ValueError, match=r"looks like a \[0, 1\] image.*multiply by 255"):
        inferer.segment_volume(volume / 255.0, plan)
    with pytest.raises(ValueError, match=r"must lie in \[0, 255\].*got \[-980, -800\]"):
        inferer.segment_volume(volume - 1000.0, plan)
    assert inferer.segment_volume(volume, plan)[0].any()


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="batch_size"):
        PromptedSliceInferer(BrightObjectNet(), batch_size=0)
