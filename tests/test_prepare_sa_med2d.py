"""The SA-Med2D converter (bundle.data.convert, scripts/prepare_sa_med2d.py) on real volumes."""

import json
import os
import re
import subprocess
import sys

import itk
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from bundle.data import (
    MIN_COMPONENT_FRACTION,
    Case,
    convert_to_sa_med2d,
    image2label_json,
    label2image_json,
    read_image2label,
    read_label2image,
)
from bundle.data.convert import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK_NAME = re.compile(r"^(ct_00|mr_00|mr_t1)--Pyradiomics--[A-Za-z0-9_]+--[xz]_\d{4}--\d{4}_\d{3}\.png$")


def pair(folder, stem):
    return str(folder / f"{stem}_image.nrrd"), str(folder / f"{stem}_label.nrrd")


def label_xyz(path):
    """Label as a [x, y, z] array (ITK index order, as MONAI's ITK reader returns it)."""
    return itk.array_from_image(itk.imread(str(path))).transpose(2, 1, 0) > 0


def expected_slices(label, axis, min_fraction):
    """Slices with at least one 8-connected component of at least min_fraction of the slice area."""
    kept, all_small = [], []
    for i in range(label.shape[axis]):
        plane = np.moveaxis(label, axis, 0)[i]
        if not plane.any():
            continue
        components, count = ndimage.label(plane, structure=np.ones((3, 3)))
        areas = np.bincount(components.ravel())[1:]
        (kept if (areas >= min_fraction * plane.size).any() else all_small).append(i)
    return kept, all_small


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_data_dir, test_data_dir):
    cases = [
        Case(*pair(shared_data_dir, "lung1"), "lung1", "ct"),
        Case(*pair(shared_data_dir, "brain1"), "brain1", "mr"),
        Case(*pair(test_data_dir, "breast1_crop"), "breast1", "mr_t1"),
    ]
    out = tmp_path_factory.mktemp("convert") / "sa_med2d"
    thirds = (1 / 3, 1 / 3, 1 / 3)
    report = convert_to_sa_med2d(cases, out, "Pyradiomics", ("z", "x"), thirds, window="lung", progress=False)
    return out, report, cases


def test_one_image_per_kept_slice_per_axis(converted):
    out, report, cases = converted
    images = sorted(os.listdir(out / "images"))
    total_small = 0
    for case in cases:
        label = label_xyz(case.label)
        for axis_name, axis in (("z", 2), ("x", 0)):
            kept, all_small = expected_slices(label, axis, MIN_COMPONENT_FRACTION)
            written = [int(n[-8:-4]) for n in images if f"--{case.case}--{axis_name}_" in n]
            assert written == kept, (case.case, axis_name)
            total_small += len(all_small)
    assert report.slices_all_dropped == total_small
    # lung1's tumour covers under 400 px (0.153 %) of each 512 x 512 axial slice: all three are counted, not lost
    lung = label_xyz(cases[0].label)
    assert expected_slices(lung, 2, MIN_COMPONENT_FRACTION) == ([], [32, 33, 34])
    assert report.images == len(images) and report.masks == len(os.listdir(out / "masks"))
    assert all(MASK_NAME.match(n) for n in os.listdir(out / "masks"))


def test_png_content_is_the_windowed_slice_and_its_mask(converted, shared_data_dir):
    out, _, _ = converted
    name = "ct_00--Pyradiomics--lung1--x_0217"
    hu = itk.array_from_image(itk.imread(str(shared_data_dir / "lung1_image.nrrd"))).transpose(2, 1, 0)[217]
    expected = np.rint(np.clip((hu + 1350.0) / 1500.0, 0, 1) * 255)
    np.testing.assert_array_equal(np.array(Image.open(out / "images" / f"{name}.png")), expected)
    mask = np.array(Image.open(out / "masks" / f"{name}--0001_000.png"))
    assert set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal(mask > 0, label_xyz(shared_data_dir / "lung1_label.nrrd")[217])


def test_json_files_read_back_to_the_same_counts_and_disjoint_cases(converted):
    out, report, _ = converted
    assert len(read_image2label(out / "SAMed2D_v1.json", check_files=True)) == report.images
    seen = {}
    for split in ("train", "validation", "test"):
        train_style = read_image2label(out / image2label_json(split), check_files=True)
        test_style = read_label2image(out / label2image_json(split), check_files=True)
        assert len(test_style) == sum(len(i["label"]) for i in train_style)
        cases = {i["case"] for i in train_style} | {i["case"] for i in test_style}
        assert cases == {f"Pyradiomics--{c}" for c in report.splits[split]}
        seen[split] = cases
    assert sum(len(c) for c in seen.values()) == 3 and len(set().union(*seen.values())) == 3  # no case in two splits
    assert sum(len(read_image2label(out / image2label_json(s))) for s in seen) == report.images
    assert {i["modality"] for i in read_image2label(out / "SAMed2D_v1.json")} == {"ct", "mr"}
    assert json.loads((out / "report.json").read_text())["slices_all_dropped"] == report.slices_all_dropped


def test_empty_label_is_counted_and_bad_input_leaves_no_output(tmp_path, test_data_dir):
    image, label = test_data_dir / "breast1_crop_image.nrrd", test_data_dir / "breast1_crop_label.nrrd"
    ref = itk.imread(str(label))
    empty = itk.image_from_array(np.zeros_like(itk.array_from_image(ref)))
    empty.CopyInformation(ref)
    itk.imwrite(empty, str(tmp_path / "empty_label.nrrd"))
    report = convert_to_sa_med2d(
        [Case(str(image), str(label), "b1", "mr"), Case(str(image), str(tmp_path / "empty_label.nrrd"), "b2", "mr")],
        tmp_path / "ok",
        "Pyradiomics",
        fractions=(1, 0, 0),
        progress=False,
    )
    assert report.empty_cases == ["b2"] and report.images > 0
    assert json.loads((tmp_path / "ok" / "report.json").read_text())["empty_cases"] == ["b2"]

    with pytest.raises(FileExistsError, match="output exists"):
        convert_to_sa_med2d([Case(str(image), str(label), "b1", "mr")], tmp_path / "ok", "P", progress=False)
    bad = Case(str(image), str(test_data_dir / "lung1_crop_label.nrrd"), "mismatch", "mr")
    with pytest.raises(ValueError, match="lung1_crop_label.nrrd: label grid"):
        good = Case(str(image), str(label), "b1", "mr")
        convert_to_sa_med2d([good, bad], tmp_path / "failed", "P", fractions=(1, 0, 0), progress=False)
    with pytest.raises(ValueError, match=r"breast1_crop_image.nrrd: modality unknown"):
        convert_to_sa_med2d([Case(str(image), str(label), "b1")], tmp_path / "failed", "P", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["empty_label.nrrd", "ok"]  # no partial output left behind
    assert main(["--pair", str(image), str(label), "--dataset", "P", "--output", str(tmp_path / "cli")]) == 1


def test_dicom_series_with_label_map_takes_modality_from_the_tag(tmp_path, test_data_dir, write_dicom_series):
    image_path, label_path = pair(test_data_dir, "breast1_crop")
    ref = itk.imread(image_path)
    volume = itk.array_from_image(ref).transpose(2, 1, 0)
    series = write_dicom_series(volume, tuple(ref.GetSpacing()), tuple(ref.GetOrigin()), tmp_path / "breast_dcm", "MR")
    case = Case(str(series), label_path, "b1")  # no modality given: MR from the DICOM tag
    report = convert_to_sa_med2d([case], tmp_path / "out", "P", fractions=(1, 0, 0), progress=False)
    kept = expected_slices(label_xyz(label_path), 2, MIN_COMPONENT_FRACTION)[0]
    assert sorted(os.listdir(tmp_path / "out" / "images")) == [f"mr_00--P--b1--z_{i:04d}.png" for i in kept]
    assert report.images == len(kept)


@pytest.mark.slow
def test_cli_subprocess(tmp_path, test_data_dir):
    datalist = tmp_path / "cases.json"
    cases = [("lung1_crop", "ct"), ("breast1_crop", "mr")]
    items = [dict(zip(("image", "label"), pair(test_data_dir, stem)), modality=modality) for stem, modality in cases]
    datalist.write_text(json.dumps(items))
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "scripts", "prepare_sa_med2d.py"), "--datalist", str(datalist)]
    cmd += ["--dataset", "Pyradiomics", "--axes", "z", "x", "--split", "0.5", "0.5", "0", "--window", "1500,-600"]
    cmd += ["--output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "lung1_crop_image (" in result.stderr and "cases: 100%" in result.stderr  # progress on stderr
    report = json.loads((out / "report.json").read_text())
    assert f"{report['images']} images" in result.stdout
    assert {len(v) for v in report["splits"].values()} == {1, 0}
    for stem, _ in cases:
        name, label = f"{stem}_image", label_xyz(pair(test_data_dir, stem)[1])
        for axis_name, axis in (("z", 2), ("x", 0)):
            written = sorted(int(n[-8:-4]) for n in os.listdir(out / "images") if f"--{name}--{axis_name}_" in n)
            assert written == expected_slices(label, axis, MIN_COMPONENT_FRACTION)[0]
