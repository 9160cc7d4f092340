"""Reading every supported format through LoadMedicalImage(d), metadata kept, bad files named."""

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from bundle.transforms import LoadMedicalImage, LoadMedicalImaged, ModalityNormalize, modality_from_meta


@pytest.fixture(scope="module")
def loader():
    return LoadMedicalImage()


@pytest.fixture(scope="module")
def lung_crop(loader, test_data_dir):
    return loader(test_data_dir / "lung1_crop_image.nrrd")


def test_nrrd_keeps_geometry(lung_crop, test_data_dir):
    ref = itk.imread(str(test_data_dir / "lung1_crop_image.nrrd"))
    assert tuple(lung_crop.shape) == (1, 96, 96, 8)
    # ITK array order reversed -> [x, y, z]; values are the HU integers
    np.testing.assert_array_equal(lung_crop[0].numpy(), itk.array_from_image(ref).transpose(2, 1, 0))
    np.testing.assert_allclose(lung_crop.meta["spacing"], [0.5703125, 0.5703125, 5.0])
    np.testing.assert_allclose(np.abs(np.diag(lung_crop.affine.numpy()))[:3], [0.5703125, 0.5703125, 5.0])
    assert lung_crop.meta["filename_or_obj"].endswith("lung1_crop_image.nrrd")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_nifti_and_mha_read_back_same_array_and_affine(loader, lung_crop, tmp_path, suffix):
    path = tmp_path / f"vol{suffix}"
    itk.imwrite(itk.imread(lung_crop.meta["filename_or_obj"]), str(path))
    img = loader(path)
    np.testing.assert_array_equal(img.numpy(), lung_crop.numpy())
    np.testing.assert_allclose(img.affine.numpy(), lung_crop.affine.numpy(), atol=1e-4)


def test_dicom_series_reads_back_array_spacing_modality(loader, lung_crop, tmp_path, write_dicom_series):
    volume = lung_crop[0].numpy().astype(np.int16)
    spacing = (0.5703125, 0.5703125, 5.0)
    write_dicom_series(volume, spacing, (-49.0, -147.0, -627.5), tmp_path / "series", "CT")
    img = loader(tmp_path / "series")
    np.testing.assert_array_equal(img[0].numpy(), volume)
    np.testing.assert_allclose(img.meta["spacing"], spacing, rtol=1e-5)
    assert img.meta["0008|0060"].strip() == "CT"
    assert modality_from_meta(img.meta) == "ct"
    # so the normaliser needs no configured modality for it
    out = ModalityNormalize(window="lung")(img)
    assert out.meta["modality"] == "ct" and out.shape == (3, 96, 96, 8)


def test_png_and_jpg_are_read_column_first_as_loadimage_reads_them(loader, tmp_path):
    """A 2D image is ``[C, x, y]``: ``image[:, x, y]`` is the pixel in column x, row y (MONAI ``LoadImage``)."""
    from monai.transforms import LoadImage

    grey = np.arange(30 * 50, dtype=np.uint8).reshape(30, 50)  # 30 rows, 50 columns
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb = np.random.RandomState(0).randint(0, 255, (30, 50, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    g = loader(tmp_path / "g.png")
    assert tuple(g.shape) == (1, 50, 30)
    np.testing.assert_array_equal(g[0].numpy(), grey.T)
    assert float(g[0, 7, 3]) == grey[3, 7]  # column 7, row 3
    np.testing.assert_array_equal(g.numpy(), LoadImage(image_only=True, ensure_channel_first=True)(tmp_path / "g.png"))
    c = loader(tmp_path / "c.png")
    np.testing.assert_array_equal(c.numpy(), rgb.transpose(2, 1, 0))
    assert tuple(loader(tmp_path / "c.jpg").shape) == (3, 50, 30)


def test_dict_version_stacks_mask_list(tmp_path):
    for i in range(3):
        m = np.zeros((20, 24), np.uint8)
        m[i : i + 5, 2:9] = 255
        Image.fromarray(m).save(tmp_path / f"m{i}.png")
    d = LoadMedicalImaged(["label"])({"label": [str(tmp_path / f"m{i}.png") for i in range(3)]})
    assert tuple(d["label"].shape) == (3, 24, 20)  # [masks, x, y]
    assert torch.equal(d["label"][2, 2, 2:7], torch.full((5,), 255.0))


def test_missing_file_is_named(loader, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        loader(tmp_path / "nothere.nii.gz")


@pytest.mark.parametrize("name,content", [("bad.nii.gz", b"not an image" * 20), ("bad.png", b"\x89PNG\r\n garbage")])
def test_corrupt_file_is_named(loader, tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}: cannot be read as an image: corrupt file"):
        loader(tmp_path / name)


def test_4d_image_is_rejected_with_name(loader, tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 5, 3), np.float32), np.eye(4)), str(tmp_path / "series4d.nii.gz"))
    with pytest.raises(ValueError, match=r"series4d.nii.gz: 3 channels .* 4D"):
        loader(tmp_path / "series4d.nii.gz")
