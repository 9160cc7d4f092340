"""Label-map evaluation (configs/evaluate.json with --eval_datalist): Dice and NSD per label of multi-object
datalists, prompted from the ground truth or by the items' own objects; nothing skipped."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from constructed import BrightObjectNet, write_spheres
from train_helpers import REPO_ROOT, workflow

from bundle.inferers import ObjectEvaluator, PromptedSliceInferer, build_datalist


def write_truth(tmp_path):
    masks = write_spheres(tmp_path / "scan.nii.gz")
    truth = (masks[0] * 1 + masks[1] * 2).astype(np.uint8)
    nib.save(nib.Nifti1Image(truth, np.diag([0.8, 0.8, 2.5, 1.0])), str(tmp_path / "truth.nii.gz"))
    return masks


def test_per_label_dice_and_nsd_from_ground_truth_boxes_and_given_objects(tmp_path):
    write_truth(tmp_path)
    items = [
        {"image": "scan.nii.gz", "label": "truth.nii.gz", "modality": "ct"},  # no prompt: a 3D box per label
        {
            "image": "scan.nii.gz",
            "label": "truth.nii.gz",
            "output_name": "left_only.nii.gz",
            "modality": "ct",
            "objects": [{"slice_box": [9, 19, 31, 41], "slice_index": 8, "name": "left", "label": 1}],
        },
    ]
    (tmp_path / "cases.json").write_text(json.dumps(items))
    inferer = PromptedSliceInferer(BrightObjectNet(), batch_size=4, mask_inputs=True)
    evaluator = ObjectEvaluator(inferer, build_datalist(datalist=str(tmp_path / "cases.json")), tmp_path / "eval")
    summary = evaluator.run()
    assert inferer.mask_inputs  # the switch is the user's again after the ground-truth runs
    with open(tmp_path / "eval" / "per_label.csv") as f:
        rows = list(csv.DictReader(f))
    by_output = {(r["name"], r["label"]): r for r in rows}
    assert len(rows) == 4  # two labels of the box run, and of the left-only run both labels (one missed)
    boxed = [r for r in rows if r["mask"].endswith("scan_seg.nii.gz")]
    assert sorted(r["label"] for r in boxed) == ["1", "2"] and all(float(r["dice"]) > 0.95 for r in boxed)
    assert float(by_output[("left", "1")]["dice"]) > 0.9
    missed = [r for r in rows if r["name"] == "label_2" and r["pred_voxels"] == "0"]
    assert len(missed) == 1 and float(missed[0]["dice"]) == 0.0 and float(missed[0]["nsd"]) == 0.0
    assert summary["all"]["n"] == 4 and summary["labels"]["left"]["n"] == 1 and summary["nsd_tolerance_mm"] == 2.0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == summary
    assert (tmp_path / "eval" / "masks" / "scan_seg.nii.gz").is_file()


def test_ground_truth_of_another_size_is_refused_before_inference(tmp_path):
    write_truth(tmp_path)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), str(tmp_path / "small.nii.gz"))
    net = BrightObjectNet()
    items = [{"image": str(tmp_path / "scan.nii.gz"), "label": str(tmp_path / "small.nii.gz")}]
    with pytest.raises(ValueError, match=r"mask of size \[8, 8, 8\] for an image of size"):
        ObjectEvaluator(PromptedSliceInferer(net), items, tmp_path / "eval").run()
    assert net.encode_calls == 0 and not (tmp_path / "eval").exists()
    with pytest.raises(ValueError, match="no ground truth"):
        ObjectEvaluator(PromptedSliceInferer(net), [{"image": str(tmp_path / "scan.nii.gz")}], tmp_path / "e").run()


def test_evaluate_config_runs_the_object_evaluation_of_a_datalist(tmp_path):
    """evaluate.json over train.json's network with --eval_datalist: the committed two-object lung1 crop."""
    wf = workflow(
        ["train.json", "evaluate.json"],
        "infer",
        tmp_path,
        eval_datalist=str(REPO_ROOT / "tests" / "data" / "lung1_crop_objects.json"),
        ckpt_path="",
    )
    wf.initialize()
    wf.run()
    out = tmp_path / "eval" / "evaluation" / "objects"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["labels"]) == {"label_1", "label_2"} and summary["images"] == 1
    assert all(0.0 <= s["dice_mean"] <= 1.0 and 0.0 <= s["nsd_mean"] <= 1.0 for s in summary["labels"].values())
    written = nib.load(str(out / "masks" / "lung1_crop_image_seg.nii.gz"))
    assert written.shape == (96, 96, 8)
    assert json.loads((out / "masks" / "lung1_crop_image_seg.json").read_text())["label_names"] == {
        "label_1": 1,
        "label_2": 2,
    }
