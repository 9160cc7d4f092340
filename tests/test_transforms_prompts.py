"""Prompt samplers: boxes, points, corrective clicks, 3D boxes; seeding; empty masks."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from bundle.transforms import (
    Box3DPromptd,
    RandBoxPromptd,
    RandCorrectiveClickd,
    RandPointPromptd,
    box3d_from_mask,
    box_from_mask,
    corrective_click,
    sample_points,
)


@pytest.fixture
def two_blobs():
    mask = np.zeros((64, 80), np.uint8)
    mask[10:30, 40:71] = 1  # large: rows 10..29, cols 40..70
    mask[50:55, 5:9] = 1  # small
    return mask


def test_box_contains_largest_component_exactly(two_blobs):
    assert box_from_mask(two_blobs).tolist() == [40, 10, 70, 29]
    assert box_from_mask(two_blobs, largest=False).tolist() == [5, 10, 70, 54]
    assert box_from_mask(torch.as_tensor(two_blobs)[None]).tolist() == [40, 10, 70, 29]  # [1, H, W] tensors too


def test_box_on_real_mask_contains_the_component(test_data_dir):
    from bundle.transforms import LoadMedicalImage

    label = LoadMedicalImage()(test_data_dir / "lung1_crop_label.nrrd")[0, :, :, 3].numpy() > 0
    x0, y0, x1, y1 = box_from_mask(label)
    rows, cols = np.nonzero(label)
    assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max(), rows.max())


def test_sam_unet_jitter_stays_within_bound(two_blobs):
    exact = box_from_mask(two_blobs)
    shifts = np.stack([box_from_mask(two_blobs, jitter=5, rng=seed) - exact for seed in range(200)])
    assert np.abs(shifts).max() == 5 and shifts.min() == -5  # bound reached, never exceeded
    # short side 19 px -> bound min(jitter, 19 // 2) = 9 for a large jitter
    shifts = np.stack([box_from_mask(two_blobs, jitter=50, rng=seed) - exact for seed in range(200)])
    assert np.abs(shifts).max() == 9
    tiny = np.zeros((10, 10), np.uint8)
    tiny[4:7, 4:6] = 1  # short side 1 -> no room to jitter
    assert all(box_from_mask(tiny, jitter=5, rng=s).tolist() == [4, 4, 5, 6] for s in range(20))


def test_medsam_jitter_only_enlarges_within_bound(two_blobs):
    exact = box_from_mask(two_blobs)
    boxes = np.stack([box_from_mask(two_blobs, jitter=5, mode="medsam", rng=s) for s in range(200)])
    deltas = (boxes - exact) * [-1, -1, 1, 1]  # outward moves
    assert deltas.min() == 0 and deltas.max() == 5
    edge = np.zeros((20, 20), np.uint8)
    edge[0:5, 15:20] = 1  # touches the top-right corner: clipped to the image
    for s in range(20):
        x0, y0, x1, y1 = box_from_mask(edge, jitter=5, mode="medsam", rng=s)
        assert y0 == 0 and x1 == 19 and 10 <= x0 <= 15 and 4 <= y1 <= 9


def test_points_follow_sam_med2d_mix(two_blobs):
    points, labels = sample_points(two_blobs, 1, rng=0)
    assert labels.tolist() == [1] and two_blobs[points[0, 1], points[0, 0]] == 1
    points, labels = sample_points(two_blobs, 5, rng=0)
    assert points.shape == (5, 2) and sorted(labels.tolist()) == [0, 0, 0, 1, 1]
    assert (two_blobs[points[:, 1], points[:, 0]] == labels).all()  # x = column, y = row


def test_corrective_clicks_land_in_error_region():
    rng = np.random.RandomState(3)
    for _ in range(50):
        gt = rng.rand(32, 32) > 0.6
        pred = gt ^ (rng.rand(32, 32) > 0.9)
        for mode, n in (("random", 4), ("center", 1)):
            points, labels = corrective_click(pred, gt, rng, n=n, mode=mode)
            x, y = points[:, 0], points[:, 1]
            assert (pred[y, x] != gt[y, x]).all()
            assert (labels == gt[y, x]).all()  # false negative -> 1, false positive -> 0


def test_corrective_click_center_and_no_error():
    gt = np.zeros((40, 40), bool)
    gt[5:25, 5:25] = True
    pred = np.zeros_like(gt)
    pred[5:25, 5:15] = True  # misses columns 15..24: the click goes to the middle of the miss
    points, labels = corrective_click(pred, gt, mode="center")
    # 5 px from the miss's border: the middle columns, away from its top and bottom edges
    assert labels.tolist() == [1] and 19 <= points[0, 0] <= 20 and 9 <= points[0, 1] <= 20
    points, labels = corrective_click(gt, gt, n=2)
    assert labels.tolist() == [-1, -1] and points.tolist() == [[0, 0], [0, 0]]  # padding: nothing to correct
    with pytest.raises(ValueError, match="differs from ground truth shape"):
        corrective_click(pred[:10], gt)


def test_box3d_from_mask():
    mask = np.zeros((20, 30, 10), np.uint8)
    mask[2:6, 10:21, 3:8] = 1
    mask[15, 0, 0] = 1  # a stray voxel, not the largest component
    assert box3d_from_mask(mask).tolist() == [2, 10, 3, 5, 20, 7]
    assert box3d_from_mask(mask, largest=False).tolist() == [2, 0, 0, 15, 20, 7]


def test_same_seed_same_prompts(two_blobs):
    label = torch.as_tensor(np.stack([two_blobs, two_blobs[::-1].copy()]))
    pred = torch.zeros_like(label)

    def pipeline(seed):
        chain = Compose([RandBoxPromptd(jitter=5), RandPointPromptd(n=3), RandCorrectiveClickd(n=2)])
        chain.set_random_state(seed=seed)
        return chain({"label": label, "pred": pred})

    a, b, c = pipeline(7), pipeline(7), pipeline(8)
    assert a["box"].shape == (2, 4) and a["points"].shape == (2, 5, 2) and a["point_labels"].shape == (2, 5)
    for key in ("box", "points", "point_labels"):
        assert torch.equal(a[key], b[key])
    assert not all(torch.equal(a[k], c[k]) for k in ("box", "points"))
    # appended corrective clicks (pred is empty: all errors are misses -> positive)
    assert a["point_labels"][:, 3:].eq(1).all()
    assert Box3DPromptd()({"label": torch.ones(1, 3, 4, 5)})["box3d"].tolist() == [0, 0, 0, 2, 3, 4]


def test_empty_mask_errors_name_key_and_file():
    empty = MetaTensor(torch.zeros(2, 16, 16), meta={"filename_or_obj": "/data/masks/case7_mask.png"})
    empty[0, 3:6, 3:6] = 1  # mask 0 has foreground, mask 1 is empty
    with pytest.raises(ValueError, match=r"key 'label' \(file /data/masks/case7_mask.png\) mask 1: empty mask"):
        RandBoxPromptd()({"label": empty})
    with pytest.raises(ValueError, match=r"key 'label' \(file /data/masks/case7_mask.png\) mask 1: empty mask"):
        RandPointPromptd()({"label": empty})
    with pytest.raises(ValueError, match="empty mask"):
        box3d_from_mask(np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="whole image"):
        sample_points(np.ones((4, 4)), 2)
