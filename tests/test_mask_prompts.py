"""Existing masks as prompts, with a constructed network: the box on each slice a mask covers, propagation beyond it,
the low-res mask fed to the decoder only when switched on, and bad masks refused before any inference."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from constructed import SHAPE, BrightObjectNet, CentreWeightedNet, two_spheres, write_spheres
from PIL import Image

from bundle.inferers import (
    PromptedSliceInferer,
    SliceFrame,
    VolumeInferenceRunner,
    check_label_map,
    label_map_plans,
    load_mask_prompt,
    mask_plan,
    to_slices,
)

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def save(path, array):
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return str(path)


def run(items, out, network=None, **kwargs):
    inferer = PromptedSliceInferer(network or BrightObjectNet(), batch_size=4, **kwargs)
    return VolumeInferenceRunner(inferer, items, str(out), modality="ct").run()


def read(path):
    return np.asarray(nib.load(str(path)).dataobj)


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def tight_box(mask2d):
    rows, cols = np.nonzero(mask2d)
    return [int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())]


# --------------------------------------------------------------------------------------------------------------- API
def test_mask_plan_gives_the_box_and_mask_of_every_covered_slice():
    _, (a, b) = two_spheres()
    label = (a * 2 + b * 7).astype(np.uint8)
    label[..., :6] = 0  # the mask covers slices 6.. only
    plans = label_map_plans(to_slices(label[None], 2), axis=2)
    assert sorted(plans) == [2, 7]
    plan = plans[2]
    assert plan.propagate and plan.axis == 2 and plan.num_slices == SHAPE[2]
    assert sorted(plan.seeds) == sorted(set(np.nonzero(a[..., 6:])[2] + 6))
    for k, seed in plan.seeds.items():
        assert list(seed.box) == tight_box(a[..., k]) and np.array_equal(seed.mask, a[..., k])
    whole = mask_plan(to_slices(label[None], 2), axis=2)  # value None: all non-zero voxels are one object
    assert tight_box(a[..., 8] | b[..., 8]) == list(whole.seeds[8].box)


def test_slice_mask_to_low_res_logits_round_trip():
    frame = SliceFrame((70, 110), 256)
    mask = np.zeros((70, 110), bool)
    mask[20:50, 30:90] = True
    low = frame.mask_to_low_res(mask, 64)
    assert low.shape == (1, 64, 64) and float(low.max()) == 10.0 and float(low.min()) == -10.0
    back = frame.logits_to_slice(torch.nn.functional.interpolate(low[None], (256, 256), mode="bilinear"))[0] > 0
    assert 2 * (back.numpy() & mask).sum() / (back.numpy().sum() + mask.sum()) > 0.97


@pytest.mark.parametrize(
    "values, message",
    [
        (np.zeros((4, 5, 6), np.uint8), "mask of size"),
        (np.full((4, 5, 3), 0.5, np.float32), "not a label map"),
        (np.full((4, 5, 3), -1, np.int16), "negative value"),
        (np.full((4, 5, 3), np.nan, np.float32), "NaN"),
        (np.full((4, 5, 3), 70000, np.int32), "over 65535"),
        (np.zeros((4, 5, 3), np.uint8), "empty"),
    ],
)
def test_check_label_map_refuses_what_is_not_a_label_map_of_the_image(values, message):
    with pytest.raises(ValueError, match=message):
        check_label_map(values, (4, 5, 3), "m.nii.gz")


def test_a_2d_mask_for_a_volume_goes_on_its_slice(tmp_path):
    mask2d = np.zeros(SHAPE[:2], np.uint8)
    mask2d[10:20, 30:40] = 255
    Image.fromarray(np.ascontiguousarray(mask2d.T)).save(tmp_path / "slice.png")
    # a PNG reads as LoadImage reads it, [x, y]: its columns are the first in-plane array axis of the image's slices
    label = load_mask_prompt(tmp_path / "slice.png", SHAPE, slice_index=8, axis=2)
    assert label.dtype == np.uint16 and set(np.unique(label)) == {0, 1}  # a 0/255 picture is one object
    assert np.array_equal(np.nonzero(label)[2], np.full(100, 8))
    with pytest.raises(ValueError, match="give the slice_index"):
        load_mask_prompt(tmp_path / "slice.png", SHAPE)
    with pytest.raises(ValueError, match="slices of the image along axis 0"):
        load_mask_prompt(tmp_path / "slice.png", SHAPE, slice_index=3, axis=0)


# ------------------------------------------------------------------------------------------------------- the runner
def test_mask_prompt_seeds_the_slices_it_covers_and_propagates_beyond(tmp_path):
    masks = write_spheres(tmp_path / "scan.nii.gz")
    covered = masks[0].copy()
    covered[..., [k for k in range(SHAPE[2]) if k not in (7, 8, 9)]] = False  # slices 7-9 of sphere A only
    path = save(tmp_path / "tumour.nii.gz", covered.astype(np.uint8))
    (result,) = run([{"image": str(tmp_path / "scan.nii.gz"), "mask_prompt": path}], tmp_path / "out")
    written = read(result["mask"])
    assert result["label_names"] == {"label_1": 1}
    # a tight box loses a few edge voxels to the network frame's resampling; propagated slices have a margin
    assert not (written[~masks[0]]).any() and dice(written > 0, masks[0]) > 0.95
    assert result["slices"] == sorted(set(np.nonzero(masks[0])[2].tolist())) and len(result["slices"]) > 3


def test_box_from_the_mask_equals_the_box_given_by_hand(tmp_path):
    masks = write_spheres(tmp_path / "scan.nii.gz")
    on_slice = np.zeros(SHAPE, np.uint8)
    on_slice[..., 8] = masks[0][..., 8]
    hand_box = tight_box(masks[0][..., 8])
    assert hand_box == [12, 22, 28, 38]
    from_mask = run(
        [{"image": str(tmp_path / "scan.nii.gz"), "mask_prompt": save(tmp_path / "m.nii.gz", on_slice)}],
        tmp_path / "a",
    )
    by_hand = run([{"image": str(tmp_path / "scan.nii.gz"), "slice_box": hand_box, "slice_index": 8}], tmp_path / "b")
    np.testing.assert_array_equal(read(from_mask[0]["mask"]) > 0, read(by_hand[0]["mask"]) > 0)
    assert from_mask[0]["prompted_slices"] == by_hand[0]["prompted_slices"]


def test_a_label_map_as_mask_prompt_keeps_its_labels_and_names(tmp_path):
    masks = write_spheres(tmp_path / "scan.nii.gz")
    label = (masks[0] * 2 + masks[1] * 300).astype(np.uint16)
    path = save(tmp_path / "previous.nii.gz", label)
    (tmp_path / "previous.json").write_text(json.dumps({"label_names": {"left": 2, "right": 300}}))
    (result,) = run([{"image": str(tmp_path / "scan.nii.gz"), "mask_prompt": path}], tmp_path / "out")
    written = read(result["mask"])
    assert written.dtype == np.uint16 and result["label_names"] == {"left": 2, "right": 300}
    assert set(np.unique(written)) == {0, 2, 300}
    assert dice(written == 2, masks[0]) > 0.95 and dice(written == 300, masks[1]) > 0.95


def test_object_mask_prompt_with_one_label_and_a_click(tmp_path):
    masks = write_spheres(tmp_path / "scan.nii.gz")
    label = (masks[0] * 2 + masks[1] * 3).astype(np.uint8)
    path = save(tmp_path / "previous.nii.gz", label)
    objects = [{"mask_prompt": path, "mask_label": 3, "name": "right"}, {"points": [[20, 30, 8]], "point_labels": [1]}]
    (result,) = run([{"image": str(tmp_path / "scan.nii.gz"), "objects": objects}], tmp_path / "out")
    written = read(result["mask"])
    assert result["label_names"] == {"right": 1, "label_2": 2}
    assert dice(written == 1, masks[1]) > 0.95 and dice(written == 2, masks[0]) > 0.95
    with pytest.raises(ValueError, match=r"mask_label 5 is not in the mask \(its labels: \[2, 3\]\)"):
        run([{"image": str(tmp_path / "scan.nii.gz"), "objects": [{"mask_prompt": path, "mask_label": 5}]}], tmp_path)


def test_mask_inputs_reach_the_decoder_only_when_switched_on(tmp_path):
    masks = write_spheres(tmp_path / "scan.nii.gz")
    covered = masks[0].copy()
    covered[..., :8] = False
    path = save(tmp_path / "m.nii.gz", covered.astype(np.uint8))
    item = [{"image": str(tmp_path / "scan.nii.gz"), "mask_prompt": path}]
    off, on = CentreWeightedNet(), CentreWeightedNet()
    run(item, tmp_path / "off", network=off, mask_inputs=False)
    run(item, tmp_path / "on", network=on)  # on by default
    assert all(m is None for m in off.mask_inputs_seen)
    fed = [m for m in on.mask_inputs_seen if m is not None]
    # the covered slices 8-12, batch_size 4 at a time
    assert [m.shape for m in fed] == [(4, 1, 64, 64), (1, 1, 64, 64)]
    assert (fed[0] > 0).any() and (fed[0] < 0).any()
    assert on.mask_inputs_seen.count(None) == len(on.mask_inputs_seen) - 2  # propagated slices: box only


def bad_mask_cases(tmp_path):
    shape_wrong = save(tmp_path / "small.nii.gz", np.ones((10, 10, 4), np.uint8))
    probability = save(tmp_path / "prob.nii.gz", np.full(SHAPE, 0.4, np.float32))
    empty = save(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.uint8))
    huge = np.zeros(SHAPE, np.int32)
    huge[20, 30, 8] = 70000
    return [
        (shape_wrong, "mask of size \\[10, 10, 4\\] for an image of size \\[64, 96, 16\\]"),
        (probability, "not a label map"),
        (empty, "empty"),
        (save(tmp_path / "huge.nii.gz", huge), "label 70000 is over 65535"),
    ]


def test_bad_masks_are_refused_before_any_inference(tmp_path):
    write_spheres(tmp_path / "scan.nii.gz")
    good = [{"image": str(tmp_path / "scan.nii.gz"), "box": [33, 55, 5, 55, 77, 11]}]
    for path, message in bad_mask_cases(tmp_path):
        net = BrightObjectNet()
        with pytest.raises(ValueError, match=message):
            run(good + [{"image": str(tmp_path / "scan.nii.gz"), "mask_prompt": path}], tmp_path / "out", net)
        assert net.encode_calls == 0 and not (tmp_path / "out").exists()


def test_mask_prompt_on_a_2d_image_writes_a_label_png(tmp_path):
    volume, _ = two_spheres(shape=(64, 96, 1), centres=((20, 30, 0), (44, 66, 0)))
    Image.fromarray(volume[..., 0].astype(np.uint8)).save(tmp_path / "photo.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[volume[..., 0] > 100] = 255
    mask[:, 48:] = 0  # the left disc only
    Image.fromarray(mask).save(tmp_path / "photo_mask.png")
    inferer = PromptedSliceInferer(BrightObjectNet(), batch_size=4)
    runner = VolumeInferenceRunner(
        inferer,
        [{"image": str(tmp_path / "photo.png"), "mask_prompt": str(tmp_path / "photo_mask.png")}],
        str(tmp_path / "out"),
        modality="dermoscopy",
        output_format="input",
    )
    (result,) = runner.run()
    written = np.asarray(Image.open(result["mask"]))
    assert result["mask"].endswith("photo_seg.png") and set(np.unique(written)) == {0, 1}
    assert not (written[mask == 0]).any() and dice(written > 0, mask > 0) > 0.95


def test_earlier_low_res_logits_are_fed_as_they_are():
    """``SlicePrompt.mask_logits`` (the decoder's own low-res output of an earlier pass) goes to the decoder as given,
    ahead of a slice mask; the same prompt with the switch off sends none."""
    from bundle.inferers import SlicePrompt

    volume, (a, _) = two_spheres()
    earlier = torch.linspace(-5, 5, 64 * 64).reshape(64, 64)
    prompt = SlicePrompt(box=(10, 20, 30, 40), mask=a[..., 8], mask_logits=earlier)
    for switch in (True, False):
        net = CentreWeightedNet()
        inferer = PromptedSliceInferer(net, mask_inputs=switch)
        inferer.segment_slice(volume, 8, prompt, axis=2)
        (seen,) = net.mask_inputs_seen
        assert (seen is not None) == switch
        if switch:
            torch.testing.assert_close(seen, earlier[None, None])
