"""Small datasets: the case split keeps a validation case, a case lost to SA-Med2D's size rule is named, and training
without validation data still leaves ``models/model.pt`` (on the committed sample, tests/data)."""

from __future__ import annotations

import json
import logging

import pytest
from train_helpers import SMALL_NET, run_bundle

from bundle.data import Case, convert_to_sa_med2d, split_cases
from bundle.data.convert import main as convert_main


@pytest.mark.parametrize("n", [2, 3, 4, 5, 9])
def test_split_never_leaves_validation_empty_with_two_or_more_cases(n):
    sizes = {name: len(cases) for name, cases in split_cases(range(n)).items()}
    assert sizes["validation"] >= 1 and sizes["train"] >= 1 and sum(sizes.values()) == n
    assert sizes["test"] == (0 if n == 2 else max(1, round(0.1 * n)))
    assert split_cases(range(n), (1, 0, 0)) == {"train": list(range(n)), "validation": [], "test": []}  # as asked


def test_a_split_left_empty_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="bundle.data.splits"):
        assert split_cases(["only"]) == {"train": ["only"], "validation": [], "test": []}
    assert "'validation' is empty: 1 case(s)" in caplog.text and "'test' is empty" in caplog.text


def test_three_sample_cases_convert_to_one_case_per_split(tmp_path, test_data_dir, capsys):
    out = tmp_path / "sa_med2d"
    argv = ["--datalist", str(test_data_dir / "volumes.json"), "--dataset", "S", "--output", str(out), "--quiet"]
    assert convert_main(argv) == 0
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(len(cases) for cases in splits.values()) == [1, 1, 1], splits
    assert "cases: train 1, validation 1, test 1" in capsys.readouterr().out


def test_a_case_lost_to_the_size_rule_is_named_with_the_rule_and_the_flag(tmp_path, test_data_dir, caplog):
    lung = Case(str(test_data_dir / "lung1_crop_image.nrrd"), str(test_data_dir / "lung1_crop_label.nrrd"), "l", "ct")
    breast = Case(
        str(test_data_dir / "breast1_crop_image.nrrd"), str(test_data_dir / "breast1_crop_label.nrrd"), "b", "mr"
    )
    # the breast lesion is at most 82 px of a 45 x 64 slice (2.8 %), the lung tumour 347 px of 96 x 96 (3.8 %)
    with caplog.at_level(logging.WARNING, logger="bundle.data.convert"):
        report = convert_to_sa_med2d(
            [lung, breast], tmp_path / "out", "S", fractions=(1, 0, 0), min_fraction=0.03, progress=False
        )
    assert report.cases_all_dropped == ["b"] and report.images > 0
    lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("b: ")]
    assert len(lost) == 1 and "size rule" in lost[0] and "--min-fraction" in lost[0] and "3 labelled slice" in lost[0]

    with pytest.raises(ValueError, match="no image written"):
        convert_to_sa_med2d([breast], tmp_path / "none", "S", fractions=(1, 0, 0), min_fraction=0.03, progress=False)
    assert not (tmp_path / "none").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_training_without_validation_saves_the_final_model_and_says_so(tmp_path, test_data_dir):
    data = tmp_path / "sa_med2d"
    case = Case(str(test_data_dir / "lung1_crop_image.nrrd"), str(test_data_dir / "lung1_crop_label.nrrd"), "l", "ct")
    convert_to_sa_med2d([case], data, "S", fractions=(1, 0, 0), progress=False)
    assert json.loads((data / "label2image_validation.json").read_text()) == {}
    overrides = {
        "bundle_root": str(tmp_path),
        "dataset_dir": str(data),
        "max_epochs": 1,
        "epoch_length": 1,
        "batch_size": 1,
        "masks_per_image": 1,
        "interactive_iterations": 0,
        "num_workers": 0,
        **SMALL_NET,
    }
    done = run_bundle(["configs/train.json"], overrides)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    model = tmp_path / "models" / "model.pt"
    assert model.is_file() and (tmp_path / "models" / "checkpoint_final.pt").is_file()
    assert f"training runs without validation, and its final weights are saved as {model}" in output
