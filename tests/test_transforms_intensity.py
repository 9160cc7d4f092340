"""Modality normalisation (CT windows, MR/PET percentiles, photographic), modality lookup, SAM pixel norm."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.transforms import (
    CT_WINDOWS,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    LoadMedicalImage,
    ModalityNormalize,
    ModalityNormalized,
    SAMPixelNormalize,
    SAMPixelNormalized,
    ct_window,
    parse_modality,
)


def ct(values, **meta):
    return MetaTensor(torch.as_tensor(values, dtype=torch.float32)[None], meta={"filename_or_obj": "ct.nii.gz", **meta})


@pytest.mark.parametrize("preset", sorted(CT_WINDOWS))
def test_ct_window_maps_edges_to_0_and_255(preset):
    w = CT_WINDOWS[preset]
    values = [w.low - 500, w.low, w.level, w.high, w.high + 500]
    out = ModalityNormalize(modality="ct", window=preset)(ct([values]))
    assert out.shape == (3, 1, 5)
    np.testing.assert_array_equal(out[0, 0].numpy(), [0, 0, 127.5, 255, 255])
    assert torch.equal(out[0], out[2])


def test_ct_presets_and_custom_window():
    assert CT_WINDOWS["soft_tissue"] == (400, 40) and CT_WINDOWS["abdomen"] == (400, 40)
    assert CT_WINDOWS["lung"] == (1500, -600) and CT_WINDOWS["bone"] == (1800, 400) and CT_WINDOWS["brain"] == (80, 40)
    assert (CT_WINDOWS["lung"].low, CT_WINDOWS["lung"].high) == (-1350, 150)
    out = ModalityNormalize(modality="ct", window=(100, 0), out_channels=1)(ct([[-50, 0, 25, 50]]))
    np.testing.assert_allclose(out[0, 0].numpy(), [0, 127.5, 191.25, 255])
    with pytest.raises(ValueError, match="unknown CT window preset 'liver'"):
        ct_window("liver")
    with pytest.raises(ValueError, match="width > 0"):
        ct_window((0, 40))


def test_mr_percentiles_match_numpy_on_real_volume(shared_data_dir):
    img = LoadMedicalImage()(shared_data_dir / "brain1_image.nrrd")
    vol = img.numpy()
    low, high = np.percentile(vol[vol > 0], [0.5, 99.5])
    expected = np.clip((vol - low) / (high - low), 0, 1) * 255
    out = ModalityNormalize(modality="mr", out_channels=1)(img)
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-3)
    # whole-volume percentiles when foreground_only=False, and configurable percentiles
    low, high = np.percentile(vol, [2, 98])
    out = ModalityNormalize(modality="mr", percentiles=(2, 98), foreground_only=False, out_channels=1)(img)
    np.testing.assert_allclose(out.numpy(), np.clip((vol - low) / (high - low), 0, 1) * 255, atol=2e-3)


def test_pet_uses_percentile_clip_and_blank_image_stays_zero():
    rng = np.random.RandomState(0)
    pet = np.zeros((1, 20, 20), np.float32)
    pet[0, 5:15, 5:15] = rng.gamma(2.0, 3.0, (10, 10))
    out = ModalityNormalize(modality="pet", out_channels=1)(pet)
    low, high = np.percentile(pet[pet > 0], [0.5, 99.5])
    np.testing.assert_allclose(out.numpy(), np.clip((pet - low) / (high - low), 0, 1) * 255, atol=2e-3)
    assert float(ModalityNormalize(modality="pet")(np.zeros((1, 8, 8), np.float32)).abs().sum()) == 0


def test_photographic_channel_handling_keeps_8bit_values():
    rgba = np.random.RandomState(1).randint(0, 256, (4, 6, 7)).astype(np.float32)
    out = ModalityNormalize(modality="dermoscopy")(rgba)
    np.testing.assert_array_equal(out.numpy(), rgba[:3])
    grey_alpha = rgba[:2]
    out = ModalityNormalize(modality="endoscopy")(grey_alpha)
    np.testing.assert_array_equal(out.numpy(), np.repeat(rgba[:1], 3, 0))
    # a 12-bit X-ray is min-max scaled to [0, 255]
    xray = np.array([[[0, 1024, 4095]]], np.float32)
    out = ModalityNormalize(modality="xray")(xray)
    np.testing.assert_allclose(out[0, 0].numpy(), [0, 1024 / 4095 * 255, 255], rtol=1e-5)
    with pytest.raises(ValueError, match="RGB image but out_channels=1"):
        ModalityNormalize(modality="fundus", out_channels=1)(rgba[:3])


def test_sa_med2d_png_is_not_windowed_again():
    # an SA-Med2D "ct_00" PNG is already 8-bit: its values pass through, modality from the name
    png = MetaTensor(torch.tensor([[[0.0, 40.0, 255.0]]]), meta={"filename_or_obj": "/d/ct_00--S--Case_1--z_0003.png"})
    out = ModalityNormalize()(png)
    np.testing.assert_array_equal(out[1, 0].numpy(), [0, 40, 255])
    assert out.meta["modality"] == "ct"


def test_modality_sources_in_order():
    img = ct([[40.0]], **{"0008|0060": "MR"})
    norm = ModalityNormalize()
    assert norm.resolve(img) == "mr"  # DICOM tag
    assert norm.resolve(img, modality="ct") == "ct"  # datalist field beats metadata
    assert ModalityNormalize(modality="pet").resolve(img, modality="ct") == "pet"  # config beats all
    assert ModalityNormalize(default_modality="ct").resolve(np.zeros((1, 2, 2))) == "ct"
    assert parse_modality("mr_flair") == "mr" and parse_modality("PT") == "pet" and parse_modality("x_ray") == "xray"
    d = ModalityNormalized("image")({"image": ct([[40.0]]), "modality": "ct_00"})
    assert d["modality"] == "ct" and float(d["image"][0, 0, 0]) == 127.5


def test_unknown_modality_is_a_clear_error():
    img = ct([[1.0]], **{"0008|0060": "SM"})
    with pytest.raises(ValueError, match=r"key 'image' \(file ct.nii.gz\): modality unknown \(DICOM Modality 'SM'"):
        ModalityNormalized("image")({"image": img})
    with pytest.raises(ValueError, match="ct.nii.gz: unknown modality .spect."):
        ModalityNormalize(modality="spect")(img)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_intensities_are_named(bad):
    img = ct([[0.0, bad, 1.0]], filename_or_obj="/scans/bad_ct.nii.gz")
    with pytest.raises(ValueError, match=r"key 'image' \(file /scans/bad_ct.nii.gz\): 1 NaN/Inf"):
        ModalityNormalized("image", modality="ct")({"image": img})


def test_multichannel_ct_is_rejected():
    with pytest.raises(ValueError, match="ct image with 2 channels; expected one grey channel"):
        ModalityNormalize(modality="ct")(np.zeros((2, 4, 4), np.float32))


def test_sam_pixel_normalize_values_and_input_untouched():
    img = torch.full((3, 4, 5), 200.0)
    out = SAMPixelNormalize()(img)
    expected = [(200 - m) / s for m, s in zip(SAM_PIXEL_MEAN, SAM_PIXEL_STD)]
    np.testing.assert_allclose(out[:, 0, 0].numpy(), expected, rtol=1e-6)
    assert float(img.min()) == 200.0
    d = SAMPixelNormalized("image")({"image": torch.zeros(3, 2, 2)})
    expected = [-m / s for m, s in zip(SAM_PIXEL_MEAN, SAM_PIXEL_STD)]
    np.testing.assert_allclose(d["image"][:, 1, 1].numpy(), expected, rtol=1e-6)
