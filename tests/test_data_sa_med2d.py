"""SA-Med2D names and JSON files (both directions) read into datalists."""

import json

import pytest

from bundle.data import (
    format_image_name,
    format_mask_name,
    modality_from_filename,
    parse_name,
    read_image2label,
    read_label2image,
    sa_med2d_prefix,
)
from bundle.transforms import RandSampleMasksd


def test_names_follow_the_pattern_and_parse_back():
    image = format_image_name("ct_00", "AbdomenCT1K", "Case_00011", "x", 40)
    assert image == "ct_00--AbdomenCT1K--Case_00011--x_0040.png"
    mask = format_mask_name(image, 1, 0)
    assert mask == "ct_00--AbdomenCT1K--Case_00011--x_0040--0001_000.png"
    parsed = parse_name(f"masks/{mask}")
    assert (parsed.prefix, parsed.dataset, parsed.case) == ("ct_00", "AbdomenCT1K", "Case_00011")
    assert (parsed.axis, parsed.index, parsed.class_id, parsed.instance) == ("x", 40, 1, 0)
    assert (parsed.case_id, parsed.modality) == ("AbdomenCT1K--Case_00011", "ct")
    flat = parse_name(format_image_name("dermoscopy_00", "ISIC", "img_1"))
    assert flat.axis is None and flat.index is None and flat.modality == "dermoscopy"
    with pytest.raises(ValueError, match="not an SA-Med2D name"):
        parse_name("images/amos_0004_75.png")
    with pytest.raises(ValueError, match="without '--'"):
        format_image_name("ct_00", "A--B", "c", "z", 1)


@pytest.mark.parametrize(
    "name,modality",
    [
        ("ct_00--D--c--z_0001.png", "ct"),
        ("mr_t2--D--c--z_0001.png", "mr"),
        ("mr_flair--D--c--z_0001.png", "mr"),
        ("pet_00--D--c--z_0001.png", "pet"),
        ("x_ray--D--c--2d_none.png", "xray"),
        ("ultrasound_00--D--c--2d_none.png", "ultrasound"),
        ("endoscopy_00--D--c--2d_none.png", "endoscopy"),
        ("dermoscopy_00--D--c--2d_none.png", "dermoscopy"),
        ("fundus_photography--D--c--2d_none.png", "fundus"),
        ("case_0001.png", None),
    ],
)
def test_modality_from_filename(name, modality):
    assert modality_from_filename(f"/data/images/{name}") == modality


def test_prefix_for_modality():
    assert [sa_med2d_prefix(m) for m in ("ct", "mr_t2", "xray", "PT")] == ["ct_00", "mr_t2", "x_ray", "pet_00"]


@pytest.fixture
def dataset(tmp_path):
    ct, mr = "ct_00--D--case1--z_0001", "mr_t1--D--case2--x_0010"
    images = {
        f"images/{ct}.png": [f"masks/{ct}--0001_000.png", f"masks/{ct}--0002_000.png"],
        f"images/{mr}.png": [f"masks/{mr}--0001_000.png"],
    }
    (tmp_path / "image2label_train.json").write_text(json.dumps(images))
    (tmp_path / "label2image_test.json").write_text(json.dumps({m: i for i, ms in images.items() for m in ms}))
    return tmp_path


def test_read_both_directions(dataset):
    train = read_image2label(dataset / "image2label_train.json")
    summary = [(i["modality"], i["case"], len(i["label"])) for i in train]
    assert summary == [("ct", "D--case1", 2), ("mr", "D--case2", 1)]
    assert train[0]["image"] == str(dataset / "images/ct_00--D--case1--z_0001.png")
    test = read_label2image(dataset / "label2image_test.json")
    assert len(test) == 3 and [i["class_id"] for i in test] == [1, 2, 1]
    assert test[1]["label"].endswith("--0002_000.png") and test[1]["image"] == train[0]["image"]


def test_k_masks_per_image_seeded(dataset):
    a = read_image2label(dataset / "image2label_train.json", masks_per_image=5, seed=1)
    b = read_image2label(dataset / "image2label_train.json", masks_per_image=5, seed=1)
    assert [len(i["label"]) for i in a] == [5, 5] and a == b
    assert set(a[0]["label"]) <= set(read_image2label(dataset / "image2label_train.json")[0]["label"])
    t = RandSampleMasksd(k=3, replace=False)
    t.set_random_state(seed=0)
    picked = t({"image": "x.png", "label": ["a", "b", "c", "d"]})["label"]
    assert len(set(picked)) == 3 and set(picked) <= {"a", "b", "c", "d"}


def test_reader_errors_name_the_file(dataset):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        read_image2label(dataset / "nothere.json")
    (dataset / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        read_image2label(dataset / "broken.json")
    (dataset / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match="empty.json: lists no images"):
        read_image2label(dataset / "empty.json")
    with pytest.raises(ValueError, match="expected a list of paths"):
        read_image2label(dataset / "label2image_test.json")  # wrong direction
    (dataset / "other.json").write_text(json.dumps({"images/case_1.png": ["masks/case_1_liver.png"]}))
    with pytest.raises(ValueError, match="other.json: modality of .*case_1.png.* unknown"):
        read_image2label(dataset / "other.json")
    assert read_image2label(dataset / "other.json", default_modality="ct")[0]["case"] == "case_1"
    with pytest.raises(FileNotFoundError, match=r"image2label_train.json: 5 listed file\(s\) missing"):
        read_image2label(dataset / "image2label_train.json", check_files=True)
