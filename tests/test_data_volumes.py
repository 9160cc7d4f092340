"""3D -> 2D slicing with instance masks (used on the fly and by the converter), and case-level splits."""

import itk
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.data import (
    MIN_COMPONENT_FRACTION,
    check_same_grid,
    instance_masks,
    iter_labelled_slices,
    load_labelled_volume,
    split_cases,
    split_datalist,
    take_slice,
)


@pytest.fixture(scope="module")
def breast(test_data_dir):
    return load_labelled_volume(test_data_dir / "breast1_crop_image.nrrd", test_data_dir / "breast1_crop_label.nrrd")


def test_take_slice_keeps_metadata_and_world_position(breast):
    image, _ = breast
    s = take_slice(image, "y", 20)
    assert tuple(s.shape) == (1, 45, 8)
    assert torch.equal(s.as_tensor(), image.as_tensor()[:, :, 20, :])
    assert s.meta["slice_axis"] == "y" and s.meta["slice_index"] == 20 and s.meta["filename_or_obj"].endswith(".nrrd")
    np.testing.assert_allclose(s.meta["spacing"], [0.664062, 2.1], rtol=1e-5)
    # voxel (i=3, j=20, k=5) of the volume is (row 3, column 5) of the slice at the same world point
    world = image.affine.numpy() @ [3, 20, 5, 1]
    np.testing.assert_allclose(s.affine.numpy() @ [3, 5, 0, 1], world, atol=1e-6)
    with pytest.raises(ValueError, match="slice 8 along 'z' is outside 0..7"):
        take_slice(image, "z", 8)
    with pytest.raises(ValueError, match="slicing axis 'w'"):
        take_slice(image, "w", 0)


def test_instance_masks_split_components_and_drop_small():
    label = np.zeros((256, 256), np.int64)
    label[10:30, 10:30] = 1  # 400 px: kept
    label[100:109, 100:111] = 1  # 99 px: under 100 px at 256 x 256, dropped
    label[200:210, 200:210] = 1  # 100 px: kept
    label[50:60, 150:170] = 3  # class 3
    masks, dropped = instance_masks(label)
    assert dropped == 1
    assert [(m.class_id, m.instance, int(m.mask.sum())) for m in masks] == [(1, 0, 400), (1, 1, 100), (3, 0, 200)]
    # the rule is a fraction of the slice area: at 512 x 512 the limit is 400 px
    big = np.kron(label, np.ones((2, 2), np.int64))
    assert instance_masks(big)[1] == 1 and MIN_COMPONENT_FRACTION == pytest.approx(0.00153, abs=1e-5)
    diagonal = np.eye(300, dtype=np.int64)  # 8-connected: one component
    assert len(instance_masks(diagonal, min_fraction=0)[0]) == 1


def test_iter_labelled_slices_on_real_crop(breast):
    image, label = breast
    lab = label[0].numpy() > 0
    for axis, a in (("z", 2), ("x", 0)):
        slices = list(iter_labelled_slices(image, label, axes=(axis,), min_fraction=0))
        expected = [i for i in range(lab.shape[a]) if np.moveaxis(lab, a, 0)[i].any()]
        assert [s.index for s in slices] == expected
        for s in slices:
            union = np.logical_or.reduce([m.mask for m in s.masks])
            np.testing.assert_array_equal(union, np.moveaxis(lab, a, 0)[s.index])
            assert torch.equal(s.image.as_tensor(), take_slice(image, axis, s.index).as_tensor())


def test_label_grid_mismatch_names_both_files(test_data_dir, breast):
    image, label = breast
    with pytest.raises(ValueError, match=r"label grid \(45, 64, 7\) differs from image grid \(45, 64, 8\)"):
        check_same_grid(image, label[..., :7])
    shifted = MetaTensor(label.as_tensor(), affine=label.affine.clone())
    shifted.affine[0, 3] += 5.0
    with pytest.raises(ValueError, match="lab.nrrd: label affine differs from the affine of img.nrrd"):
        check_same_grid(image, shifted, "img.nrrd", "lab.nrrd")
    with pytest.raises(ValueError, match=r"lung1_crop_label.nrrd: label grid .*/breast1_crop_image.nrrd"):
        load_labelled_volume(test_data_dir / "breast1_crop_image.nrrd", test_data_dir / "lung1_crop_label.nrrd")


def test_nan_volume_is_named(tmp_path, test_data_dir):
    ref = itk.imread(str(test_data_dir / "breast1_crop_image.nrrd"), itk.F)
    array = itk.array_from_image(ref)
    array[2, 3, 4] = np.nan
    bad = itk.image_from_array(array)
    bad.CopyInformation(ref)
    itk.imwrite(bad, str(tmp_path / "nan_image.nrrd"))
    with pytest.raises(ValueError, match=r"nan_image.nrrd: 1 NaN/Inf intensity value"):
        load_labelled_volume(tmp_path / "nan_image.nrrd", test_data_dir / "breast1_crop_label.nrrd")


def test_splits_are_case_level_seeded_and_disjoint():
    cases = [f"case{i:02d}" for i in range(23)]
    splits = split_cases(cases, (0.7, 0.15, 0.15), seed=3)
    assert [len(v) for v in splits.values()] == [16, 4, 3]
    assert sorted(sum(splits.values(), [])) == cases
    assert split_cases(reversed(cases), (0.7, 0.15, 0.15), seed=3) == splits  # input order does not matter
    assert split_cases(cases, (0.7, 0.15, 0.15), seed=4) != splits
    items = [{"image": f"{c}_{k}.png", "case": c} for c in cases for k in range(3)]
    by_split = split_datalist(items, (0.7, 0.15, 0.15), seed=3)
    assert {n: sorted({i["case"] for i in v}) for n, v in by_split.items()} == splits
    with pytest.raises(ValueError, match="summing to 1"):
        split_cases(cases, (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="item 0 has no 'case' field"):
        split_datalist([{"image": "a.png"}])
