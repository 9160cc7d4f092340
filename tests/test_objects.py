"""Several objects in one label map with constructed networks: each object as it is alone, overlaps to the more
probable object, one encoder pass per slice for all objects, labels and names, datalists that list an image twice."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from constructed import SHAPE, BrightObjectNet, CentreWeightedNet, two_spheres, write_spheres

from bundle.inferers import EmbeddingCache, PromptedSliceInferer, VolumeInferenceRunner, build_datalist, plan_prompts

SLICE_BOX_A = [9, 19, 31, 41]  # around sphere A on slice 8: propagates
BOX_B = [33, 55, 5, 55, 77, 11]  # 3D box around sphere B on slices 5-11: no propagation


def inferer(network=None, **kwargs):
    return PromptedSliceInferer(network or BrightObjectNet(), batch_size=4, **kwargs)


def test_two_objects_equal_their_single_runs_with_one_encoder_pass_per_slice():
    volume, _ = two_spheres()
    plan_a = plan_prompts(SHAPE, slice_box=SLICE_BOX_A, slice_index=8)
    plan_b = plan_prompts(SHAPE, box=BOX_B)
    singles, single_encoded = [], 0
    for plan in (plan_a, plan_b):
        net = BrightObjectNet()
        mask, _ = inferer(net).segment_volume(volume, plan)
        singles.append(mask)
        single_encoded += net.encoded_images
    assert singles[0].any() and singles[1].any() and not (singles[0] & singles[1]).any()

    net = BrightObjectNet()
    run = PromptedSliceInferer(net, batch_size=4, cache=EmbeddingCache())
    labels, (results_a, results_b) = run.segment_objects(volume, [plan_a, plan_b], labels=[1, 2])
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_array_equal(labels == 1, singles[0])
    np.testing.assert_array_equal(labels == 2, singles[1])
    assert {r.index for r in results_b} == set(range(5, 12)) and not any(r.propagated for r in results_b)
    assert any(r.propagated for r in results_a)
    # one encoder pass per slice for both objects (slices 5-11 serve both); a batch may run ahead of a front
    assert net.encoded_images == len(run.cache) < single_encoded
    one_by_one = BrightObjectNet()
    _, results = PromptedSliceInferer(one_by_one, batch_size=1).segment_objects(volume, [plan_a, plan_b])
    assert one_by_one.encoded_images == len({r.index for rs in results for r in rs}) == 11


def test_overlap_goes_to_the_more_probable_object_whatever_the_order():
    volume, (sphere, _) = two_spheres(centres=((32, 48, 8), (-50, -50, -50)), radius=14.0)
    left = plan_prompts(SHAPE, box=[14, 26, 4, 50, 56, 12])  # centred left of the sphere's centre
    right = plan_prompts(SHAPE, box=[14, 40, 4, 50, 70, 12])  # centred right of it
    singles = [inferer().segment_volume(volume, plan)[0] for plan in (left, right)]
    both = singles[0] & singles[1]
    assert both.sum() > 500 and (singles[0] & ~singles[1]).any() and (singles[1] & ~singles[0]).any()
    labels, _ = inferer(CentreWeightedNet()).segment_objects(volume, [left, right], labels=[3, 7])
    swapped, _ = inferer(CentreWeightedNet()).segment_objects(volume, [right, left], labels=[7, 3])
    np.testing.assert_array_equal(labels, swapped)
    np.testing.assert_array_equal(labels > 0, singles[0] | singles[1])
    assert (labels[singles[0] & ~singles[1]] == 3).all() and (labels[singles[1] & ~singles[0]] == 7).all()
    # overlap: the nearer box centre (j 41 vs 55) has the higher logit
    j = np.nonzero(both)[1]
    assert (labels[both][j < 47] == 3).all() and (labels[both][j > 49] == 7).all()


def test_labels_over_255_give_a_uint16_label_map():
    volume, _ = two_spheres()
    plans = [plan_prompts(SHAPE, slice_box=SLICE_BOX_A, slice_index=8), plan_prompts(SHAPE, box=BOX_B)]
    labels, _ = inferer().segment_objects(volume, plans, labels=[1, 300])
    assert labels.dtype == np.uint16 and set(np.unique(labels)) == {0, 1, 300}
    with pytest.raises(ValueError, match=r"labels must lie in \[1, 65535\]"):
        inferer().segment_objects(volume, plans, labels=[1, 70000])


# ---------------------------------------------------------------------------------------------------- files, datalists
def run(items, out, **kwargs):
    kwargs.setdefault("modality", "ct")
    return VolumeInferenceRunner(inferer(kwargs.pop("network", None)), items, str(out), **kwargs).run()


def read(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_objects_give_a_label_map_and_a_sidecar_naming_each_label(tmp_path):
    masks = write_spheres(tmp_path / "scan.nii.gz")
    objects = [
        {"slice_box": SLICE_BOX_A, "slice_index": 8, "name": "left"},
        {"box": BOX_B, "name": "right", "label": 5},
    ]
    (result,) = run([{"image": str(tmp_path / "scan.nii.gz"), "objects": objects}], tmp_path / "out", montage=True)
    written = read(result["mask"])
    assert written.dtype == np.uint8 and set(np.unique(written)) == {0, 1, 5}
    assert result["montage"].endswith("scan_seg_montage.png")
    assert ((written == 1) == (masks[0] & (written > 0))).all() and (written == 1).sum() > 100
    sidecar = json.loads((tmp_path / "out" / "scan_seg.json").read_text())
    assert sidecar["label_names"] == {"left": 1, "right": 5} and sidecar["mask"] == result["mask"]
    assert [(o["name"], o["label"]) for o in sidecar["objects"]] == [("left", 1), ("right", 5)]
    assert sidecar["objects"][1]["voxels"] == int((written == 5).sum()) and sidecar["objects"][1]["slices"] == list(
        range(5, 12)
    )


def test_the_same_image_listed_twice_is_one_label_map_of_both_objects(tmp_path):
    write_spheres(tmp_path / "scan.nii.gz")
    items = [
        {"image": "scan.nii.gz", "slice_box": SLICE_BOX_A, "slice_index": 8, "name": "left"},
        {"image": "scan.nii.gz", "box": BOX_B, "name": "right"},
        {"image": "scan.nii.gz", "box": BOX_B, "output_name": "right_only.nii.gz"},
    ]
    (tmp_path / "list.json").write_text(json.dumps(items))
    results = run(build_datalist(datalist=str(tmp_path / "list.json")), tmp_path / "out")
    assert [r["mask"].rsplit("/", 1)[-1] for r in results] == ["scan_seg.nii.gz", "right_only.nii.gz"]
    merged, alone = read(results[0]["mask"]), read(results[1]["mask"])
    assert results[0]["label_names"] == {"left": 1, "right": 2} and set(np.unique(merged)) == {0, 1, 2}
    np.testing.assert_array_equal(merged == 2, alone > 0)  # a plain item keeps its 0/1 mask
    assert set(np.unique(alone)) == {0, 1} and "sidecar" not in results[1]


def test_objects_from_the_command_line_ids(tmp_path):
    write_spheres(tmp_path / "scan.nii.gz")
    objects = json.dumps([{"box": BOX_B, "name": "right"}, {"points": [[20, 30, 8]], "point_labels": [1]}])
    items = build_datalist(input_image=str(tmp_path / "scan.nii.gz"), objects=objects)
    (result,) = run(items, tmp_path / "out")
    assert result["label_names"] == {"right": 1, "label_2": 2}
    assert set(np.unique(read(result["mask"]))) == {0, 1, 2}


@pytest.mark.parametrize(
    "item, message",
    [
        ({"objects": []}, "non-empty list"),
        ({"objects": [{"box": BOX_B, "colour": "red"}]}, "unknown keys"),
        ({"objects": [{"box": BOX_B, "label": 0}]}, r"label must be an integer in \[1, 65535\]"),
        ({"objects": [{"box": BOX_B, "label": 70000}]}, r"label must be an integer in \[1, 65535\]"),
        ({"objects": [{"name": "empty"}]}, "no prompt"),
        ({"objects": [{"box": BOX_B, "name": "a", "label": 1}, {"box": BOX_B, "name": "b", "label": 1}]}, "named both"),
        ({"objects": [{"box": BOX_B, "name": "a", "label": 1}, {"box": BOX_B, "name": "a", "label": 2}]}, "is given"),
        ({"box": BOX_B, "objects": [{"box": BOX_B}]}, "top level"),
        ({"objects": [{"box": [33, 55, 5, 99, 77, 11]}]}, "outside the image"),
        ({"objects": '[{"box": '}, "neither a JSON list"),
    ],
)
def test_bad_objects_are_refused_before_any_output(tmp_path, item, message):
    write_spheres(tmp_path / "scan.nii.gz")
    net = BrightObjectNet()
    with pytest.raises(ValueError, match=message):
        items = build_datalist(datalist=[{"image": str(tmp_path / "scan.nii.gz"), **item}])
        run(items, tmp_path / "out", network=net)
    assert net.encode_calls == 0 and not (tmp_path / "out").exists()


def test_same_label_for_several_objects_of_one_class(tmp_path):
    write_spheres(tmp_path / "scan.nii.gz")
    objects = [{"box": BOX_B, "name": "lesion"}, {"slice_box": SLICE_BOX_A, "slice_index": 8, "name": "lesion"}]
    (result,) = run([{"image": str(tmp_path / "scan.nii.gz"), "objects": objects}], tmp_path / "out")
    assert result["label_names"] == {"lesion": 1} and set(np.unique(read(result["mask"]))) == {0, 1}
