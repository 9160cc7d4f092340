"""File-level volume inference: written masks keep the input's geometry (NIfTI, NRRD, DICOM series, PNG, single-slice
DICOM), datalists, and bad input rejected before anything is written, the input never modified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from constructed import BrightObjectNet

from bundle.inferers import PromptedSliceInferer, VolumeInferenceRunner

SHAPE = (40, 56, 12)  # array [i, j, k] as MONAI LoadImage returns it
CENTRE = (18, 30, 6)
BOX = [8, 20, 3, 28, 40, 9]


def sphere_hu(shape=SHAPE, centre=CENTRE, radius=8.0):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    mask = np.sqrt((((grid - centre) * [1, 1, 2]) ** 2).sum(-1)) < radius
    return np.where(mask, 300, -800).astype(np.int16), mask


def runner(items, out, **kwargs):
    inferer = PromptedSliceInferer(BrightObjectNet(), batch_size=4)
    kwargs.setdefault("modality", "ct")
    return VolumeInferenceRunner(inferer, items, str(out), **kwargs)


def digest(path: Path) -> str:
    paths = sorted(path.iterdir()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


def itk_geometry(path):
    image = itk.imread(str(path))
    return (
        tuple(itk.size(image)),
        np.array(itk.spacing(image)),
        np.array(itk.origin(image)),
        itk.array_from_matrix(image.GetDirection()),
    )


def assert_same_itk_geometry(a, b, atol=1e-6):
    size_a, spacing_a, origin_a, direction_a = itk_geometry(a)
    size_b, spacing_b, origin_b, direction_b = itk_geometry(b)
    assert size_a == size_b
    np.testing.assert_allclose(spacing_a, spacing_b, atol=atol)
    np.testing.assert_allclose(origin_a, origin_b, atol=atol)
    np.testing.assert_allclose(direction_a, direction_b, atol=atol)


def expected_mask(truth, box=BOX):
    inside = np.zeros(truth.shape, bool)
    inside[box[0] : box[3] + 1, box[1] : box[4] + 1, box[2] : box[5] + 1] = True
    return truth & inside


# ---------------------------------------------------------------------------------------------------------- writers
def write_nifti(path, data):
    affine = np.array([[0.0, -0.8, 0.1, 20.5], [0.9, 0.0, 0.0, -30.25], [0.0, 0.05, 2.5, 11.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_nrrd(path, data):
    image = itk.image_from_array(np.ascontiguousarray(data.transpose(2, 1, 0)))  # ITK array order is [k, j, i]
    image.SetSpacing([0.7, 0.8, 2.5])
    image.SetOrigin([-12.5, 30.0, 101.25])
    theta = np.deg2rad(20)
    direction = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1.0]])
    image.SetDirection(itk.matrix_from_array(direction))
    itk.imwrite(image, str(path))
    return path


def write_dicom_series(folder: Path, data, spacing=(0.7, 0.8, 2.5), origin=(-12.5, 30.0, 101.25)):
    """A minimal CT series (one file per slice along k; rows = j, columns = i as ITK reads DICOM)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice{k:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "TEST", "Test^Sphere"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (between rows, along j), column spacing (along i)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).astype(np.int16).tobytes()
        ds.save_as(str(path), write_like_original=False)
    return folder


# --------------------------------------------------------------------------------------------------------- geometry
def test_nifti_mask_keeps_geometry_and_lands_in_box(tmp_path):
    data, truth = sphere_hu()
    src = write_nifti(tmp_path / "case.nii.gz", data)
    before = digest(src)
    results = runner([{"image": str(src), "box": BOX}], tmp_path / "out").run()
    out = tmp_path / "out" / "case_seg.nii.gz"
    assert results[0]["mask"] == str(out) and out.is_file()
    written, original = nib.load(str(out)), nib.load(str(src))
    assert written.shape == original.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-6)
    mask = np.asarray(written.dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask > 0, expected_mask(truth))
    assert digest(src) == before
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case_seg.nii.gz"]  # no temporary files left


@pytest.mark.parametrize("output_format, name", [("nifti", "case_seg.nii.gz"), ("input", "case_seg.nrrd")])
def test_nrrd_mask_keeps_geometry(tmp_path, output_format, name):
    data, truth = sphere_hu()
    src = write_nrrd(tmp_path / "case.nrrd", data)
    before = digest(src)
    runner(
        [{"image": str(src), "slice_box": [9, 21, 27, 39], "slice_index": 6}],
        tmp_path / "out",
        output_format=output_format,
    ).run()
    out = tmp_path / "out" / name
    assert_same_itk_geometry(out, src)
    mask = itk.array_from_image(itk.imread(str(out))).transpose(2, 1, 0)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask > 0, truth)  # propagated over the whole sphere
    assert digest(src) == before


def test_dicom_series_mask_keeps_geometry(tmp_path):
    data, truth = sphere_hu()
    series = write_dicom_series(tmp_path / "series", data)
    before = digest(series)
    runner([{"image": str(series), "box": BOX}], tmp_path / "out", modality=None).run()  # modality from the tag
    out = tmp_path / "out" / "series_seg.nii.gz"
    reader = itk.ImageSeriesReader[itk.Image[itk.SS, 3]].New(
        FileNames=[str(p) for p in sorted(series.iterdir())], ImageIO=itk.GDCMImageIO.New()
    )
    reader.Update()
    dicom = reader.GetOutput()
    written = itk.imread(str(out))
    assert tuple(itk.size(written)) == tuple(itk.size(dicom)) == SHAPE
    np.testing.assert_allclose(np.array(itk.spacing(written)), np.array(itk.spacing(dicom)), atol=1e-5)
    np.testing.assert_allclose(np.array(itk.origin(written)), np.array(itk.origin(dicom)), atol=1e-5)
    np.testing.assert_allclose(
        itk.array_from_matrix(written.GetDirection()), itk.array_from_matrix(dicom.GetDirection()), atol=1e-6
    )
    np.testing.assert_array_equal(itk.array_from_image(written).transpose(2, 1, 0) > 0, expected_mask(truth))
    assert digest(series) == before


def test_dicom_series_cannot_be_written_as_input_format(tmp_path):
    series = write_dicom_series(tmp_path / "series", sphere_hu()[0])
    with pytest.raises(ValueError, match="DICOM SEG is not supported"):
        runner([{"image": str(series), "box": BOX}], tmp_path / "out", output_format="input").run()
    assert not (tmp_path / "out").exists()


def test_png_image_with_2d_box_and_clicks(tmp_path):
    """2D prompts are column first on the array ``LoadImage`` returns (``[x, y]``): box ``[x0, y0, x1, y1]``, click
    ``[x, y]``; the PNG mask is upright like its image and a NIfTI mask is ``[x, y]`` like the input's array."""
    from PIL import Image

    yy, xx = np.mgrid[:60, :90]
    disc = (yy - 25) ** 2 + (xx - 50) ** 2 < 12**2  # the file's rows (y) and columns (x)
    Image.fromarray(np.where(disc, 220, 30).astype(np.uint8)).save(tmp_path / "photo.png")
    run = runner(
        [{"image": str(tmp_path / "photo.png"), "box": [35, 10, 65, 40]}], tmp_path / "out", output_format="input"
    )
    run.run()
    written = np.asarray(Image.open(tmp_path / "out" / "photo_seg.png"))
    assert written.shape == (60, 90) and set(np.unique(written)) == {0, 255}
    np.testing.assert_array_equal(written > 0, disc)
    run = runner([{"image": str(tmp_path / "photo.png"), "points": [[50, 25]], "point_labels": [1]}], tmp_path / "out2")
    run.run()
    mask = np.asarray(nib.load(str(tmp_path / "out2" / "photo_seg.nii.gz")).dataobj)
    assert mask.shape == (90, 60)
    np.testing.assert_array_equal(mask > 0, disc.T)
    with pytest.raises(ValueError, match=r"y=60 not in \[0, 59\] \(image size 90 x 60, x then y\)"):
        runner([{"image": str(tmp_path / "photo.png"), "box": [10, 35, 40, 60]}], tmp_path / "out3").run()


def test_single_slice_dicom_is_a_2d_image(tmp_path):
    data, truth = sphere_hu()
    series = write_dicom_series(tmp_path / "series", data[..., 6:7])
    single = series / "slice000.dcm"
    runner([{"image": str(single), "box": [8, 20, 28, 40]}], tmp_path / "out", modality=None).run()
    out = tmp_path / "out" / "slice000_seg.nii.gz"
    written = itk.imread(str(out))
    mask = itk.array_from_image(written).T.reshape(SHAPE[:2])
    np.testing.assert_array_equal(mask > 0, truth[..., 6])
    with pytest.raises(ValueError, match="3D box .* for a 2D image"):
        runner([{"image": str(single), "box": [8, 20, 0, 28, 40, 0]}], tmp_path / "out3", modality=None).run()


def test_datalist_of_several_volumes(tmp_path):
    data, truth = sphere_hu()
    write_nifti(tmp_path / "a.nii.gz", data)
    write_nrrd(tmp_path / "b.nrrd", data)
    datalist = [
        {"image": "a.nii.gz", "box": BOX},
        {"image": "b.nrrd", "points": [[18, 30, 6]], "point_labels": [1], "modality": "ct"},
    ]
    (tmp_path / "list.json").write_text(json.dumps({"testing": datalist}))
    from bundle.inferers import build_datalist

    items = build_datalist(datalist=str(tmp_path / "list.json"))
    results = runner(items, tmp_path / "out", montage=True).run()
    assert [Path(r["mask"]).name for r in results] == ["a_seg.nii.gz", "b_seg.nii.gz"]
    assert Path(results[1]["montage"]).is_file()
    np.testing.assert_array_equal(np.asarray(nib.load(results[0]["mask"]).dataobj) > 0, expected_mask(truth))
    np.testing.assert_array_equal(np.asarray(nib.load(results[1]["mask"]).dataobj) > 0, truth)


# -------------------------------------------------------------------------------------------------------- bad input
BAD_PROMPTS = [
    ({"box": [0, 0, 0, 40, 10, 5]}, "outside the image: index i=40"),
    ({"box": [28, 20, 3, 8, 40, 9]}, "inverted along i"),
    ({"points": [[5, 5, 12]], "point_labels": [1]}, "click \\[5, 5, 12\\] lies outside"),
    ({"points": [[5, 5, 5]]}, "without point_labels"),
]


@pytest.mark.parametrize("prompt, message", BAD_PROMPTS)
def test_bad_prompts_rejected_before_any_output(tmp_path, prompt, message):
    src = write_nifti(tmp_path / "case.nii.gz", sphere_hu()[0])
    before = digest(src)
    with pytest.raises(ValueError, match=message) as error:
        runner([{"image": str(src), **prompt}], tmp_path / "out").run()
    assert str(src) in str(error.value)  # names the file
    assert not (tmp_path / "out").exists() and digest(src) == before


def test_bad_item_later_in_datalist_stops_everything_before_output(tmp_path):
    data = sphere_hu()[0]
    write_nifti(tmp_path / "a.nii.gz", data)
    write_nifti(tmp_path / "b.nii.gz", data)
    items = [
        {"image": str(tmp_path / "a.nii.gz"), "box": BOX},
        {"image": str(tmp_path / "b.nii.gz"), "box": [0, 0, 0, 99, 1, 1]},
    ]
    with pytest.raises(ValueError, match="b.nii.gz.*outside"):
        runner(items, tmp_path / "out").run()
    assert not (tmp_path / "out").exists()


def test_3d_box_on_2d_image(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(ValueError, match="3D box .* for a 2D image"):
        runner([{"image": str(tmp_path / "photo.png"), "box": [1, 1, 0, 5, 5, 0]}], tmp_path / "out").run()
    assert not (tmp_path / "out").exists()


def test_nan_intensities(tmp_path):
    data = sphere_hu()[0].astype(np.float32)
    data[3, 4, 5] = np.nan
    src = write_nifti(tmp_path / "case.nii.gz", data)
    before = digest(src)
    with pytest.raises(ValueError, match="case.nii.gz.*NaN"):
        runner([{"image": str(src), "box": BOX}], tmp_path / "out").run()
    assert not (tmp_path / "out").exists() and digest(src) == before


def test_output_that_would_overwrite_the_input(tmp_path):
    src = write_nifti(tmp_path / "case.nii.gz", sphere_hu()[0])
    before = digest(src)
    with pytest.raises(ValueError, match="would overwrite"):
        runner([{"image": str(src), "box": BOX}], tmp_path, output_postfix="").run()
    # a datalist whose first output is the second input
    seg = write_nifti(tmp_path / "case_seg.nii.gz", sphere_hu()[0])
    seg_before = digest(seg)
    with pytest.raises(ValueError, match="would overwrite"):
        runner([{"image": str(src), "box": BOX}, {"image": str(seg), "box": BOX}], tmp_path).run()
    assert digest(src) == before and digest(seg) == seg_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz", "case_seg.nii.gz"]


def test_output_into_a_dicom_series_folder_is_refused(tmp_path):
    series = write_dicom_series(tmp_path / "series", sphere_hu()[0])
    before = digest(series)
    with pytest.raises(ValueError, match="write into the input"):
        runner([{"image": str(series), "box": BOX}], series, modality=None).run()
    assert digest(series) == before and len(list(series.iterdir())) == SHAPE[2]


def test_missing_file_and_unknown_modality(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        runner([{"image": str(tmp_path / "nope.nii.gz"), "box": BOX}], tmp_path / "out").run()
    hu, _ = sphere_hu()
    src = write_nifti(tmp_path / "case.nii.gz", (hu + 800).astype(np.int16))  # no air: not recognisably CT
    with pytest.raises(ValueError, match="modality unknown"):
        runner([{"image": str(src), "box": BOX}], tmp_path / "out", modality=None).run()
    assert not (tmp_path / "out").exists()


def test_modality_inferred_from_hounsfield_units_and_meaningless_input_refused(tmp_path, caplog):
    hu, _ = sphere_hu()
    ct = write_nifti(tmp_path / "ct.nii.gz", hu)  # no modality anywhere, but air at -800 HU
    with caplog.at_level("INFO", logger="bundle.transforms.modality"):
        (result,) = runner([{"image": str(ct), "box": BOX}], tmp_path / "out", modality=None).run()
    assert result["voxels"] > 0 and "modality ct, inferred from its intensities" in caplog.text
    cases = [
        (ct, "mr", r"ct.nii.gz: given as mr, but 9\d% of its values are <= -500 \(range -800 to 300\)"),
        (write_nifti(tmp_path / "flat.nii.gz", np.full(SHAPE, 40, np.int16)), "ct", "the image is constant"),
    ]
    for path, modality, message in cases:
        with pytest.raises(ValueError, match=message):
            runner([{"image": str(path), "box": BOX}], tmp_path / "refused", modality=modality).run()
    assert not (tmp_path / "refused").exists()


def test_failed_write_leaves_no_partial_output(tmp_path, monkeypatch):
    src = write_nifti(tmp_path / "case.nii.gz", sphere_hu()[0])
    from monai.data import NibabelWriter

    def broken_write(self, filename, verbose=False, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(NibabelWriter, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        runner([{"image": str(src), "box": BOX}], tmp_path / "out").run()
    assert list((tmp_path / "out").iterdir()) == []


def test_output_locations_are_checked_before_anything_is_read(tmp_path):
    """A bad output_dir / postfix / output_name is refused before the (here missing) input is even opened."""
    missing = str(tmp_path / "not_read.nii.gz")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ({"output_dir": a_file}, "output_dir .*a_file is a file; give a folder"),
        ({"output_dir": a_file / "sub"}, "cannot be made: .*a_file is a file"),
        ({"output_dir": ""}, "output_dir is empty"),
        ({"output_postfix": "/../../escape"}, "output_postfix '/../../escape' must be part of a file name"),
        ({"output_name": "mask"}, "output_name 'mask' needs a name and a mask format's extension"),
        ({"output_name": "../up.nii.gz"}, "output_name '../up.nii.gz' must be part of a file name"),
        ({"output_name": ".nii.gz"}, "needs a name"),
    ]
    if Path("/proc/self").is_dir():  # a folder nobody can write in, even root
        cases.append(({"output_dir": "/proc/sam_unet_out"}, "output_dir /proc/sam_unet_out is not writable"))
    for setting, message in cases:
        item = {"image": missing, "box": BOX}
        if "output_name" in setting:
            item["output_name"] = setting.pop("output_name")
        out = setting.pop("output_dir", tmp_path / "out")
        with pytest.raises(ValueError, match=message):
            runner([item], out, **setting).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_temporary_files_a_killed_run_left_are_removed(tmp_path):
    src = write_nifti(tmp_path / "case.nii.gz", sphere_hu()[0])
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".case_seg.tmp-0123abcd.nii.gz"  # the name bundle.io.atomic_write gives the mask
    stale.write_bytes(b"")
    others = [out / ".other_seg.tmp-0123abcd.nii.gz", out / "notes.txt"]  # not this run's: kept
    for path in others:
        path.write_bytes(b"x")
    runner([{"image": str(src), "box": BOX}], out).run()
    assert not stale.exists() and all(p.exists() for p in others)
    assert sorted(p.name for p in out.iterdir()) == sorted(["case_seg.nii.gz"] + [p.name for p in others])


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_masks_are_written_compressed_when_asked_by_either_writer(tmp_path, test_data_dir, suffix):
    from bundle.io import ReferenceGeometry, load_image, write_mask

    source = test_data_dir / "lung1_crop_image.nrrd"
    image = load_image(source)
    mask = np.zeros(image.shape[1:], dtype=bool)
    mask[30:60, 30:60, 2:5] = True
    sizes = {}
    for name, reference in (("itk", ReferenceGeometry(source)), ("monai", image)):
        for compress in (False, True):
            path = write_mask(mask, reference, tmp_path / f"{name}_{compress}{suffix}", compress=compress)
            np.testing.assert_array_equal(np.asarray(load_image(path)[0]) > 0, mask)
            sizes[name, compress] = path.stat().st_size
        assert sizes[name, True] < sizes[name, False] / 10, sizes  # zlib inside the file
