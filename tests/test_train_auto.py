"""configs/train_auto.json: prompt-free task training (cached encoder outputs or whole-network training), MONAI's
property checks, and evaluation through configs/evaluate.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.engines import SupervisedTrainer
from PIL import Image

from bundle.data import EncodedViews
from bundle.networks import FeatureDecoder, SAMUNet

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
#: a small network of the task architecture (ViT of SAM's structure, no conv branch), in a 128 frame
SMALL_TASK = {
    "network_def#backbone": "vit_tiny",
    "network_def#decoder_tokens": "med",
    "weights": "",
    "pixel_normalization": "sam",
    "image_size": 128,
}


def write_case(folder: Path, index: int, hw=(150, 200)) -> dict:
    """A grey PNG with a bright disc (the target) and a darker square (not the target), and the disc's mask."""
    rng = np.random.default_rng(index)
    rows, cols = np.mgrid[: hw[0], : hw[1]]
    cy, cx, r = rng.integers(40, hw[0] - 40), rng.integers(40, hw[1] - 40), rng.integers(15, 30)
    disc = (rows - cy) ** 2 + (cols - cx) ** 2 < r**2
    pixels = 50 + 40 * rng.random(hw)
    sy, sx = rng.integers(0, hw[0] - 30), rng.integers(0, hw[1] - 30)
    pixels[sy : sy + 30, sx : sx + 30] += 60
    pixels[disc] = 200 + 30 * rng.random(int(disc.sum()))
    image, label = folder / f"case{index}.png", folder / f"case{index}_mask.png"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(image)
    Image.fromarray(disc.astype(np.uint8) * 255).save(label)
    return {"image": image.name, "label": label.name, "modality": "ultrasound"}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("task_data")
    cases = [write_case(folder, i) for i in range(7)]
    datalist = {"training": cases[:4], "validation": cases[4:6], "testing": cases[5:7]}
    (folder / "datalist.json").write_text(json.dumps(datalist, indent=1))
    return folder


def workflow(config_files, workflow_type, root: Path, dataset_dir: Path, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in config_files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(root),
        dataset_dir=str(dataset_dir),
        progress_bar=False,
        **{**SMALL_TASK, **overrides},
    )
    wf.initialize()
    return wf


@pytest.mark.parametrize("fusion", [False, True])
def test_cached_features_decode_as_the_whole_network(fusion):
    torch.manual_seed(0)
    net = SAMUNet("vit_tiny", conv_branch="none", fusion=fusion, image_size=128, pixel_normalization="sam").eval()
    decoder = FeatureDecoder(net)
    images = torch.randn(2, 3, 128, 128)
    entry = decoder.encode(images)
    assert list(entry) == ["image", *decoder.extra_keys] and len(decoder.extra_keys) == (3 if fusion else 0)
    with torch.no_grad():
        torch.testing.assert_close(decoder(entry["image"], *(entry[k] for k in decoder.extra_keys)), net(images))


def test_a_trained_conv_branch_cannot_be_cached():
    with pytest.raises(ValueError, match="conv branch is trained"):
        FeatureDecoder(SAMUNet("vit_tiny", conv_branch="resnet18", image_size=128, pixel_normalization="sam"))


def test_train_then_evaluate_on_the_original_grid(tmp_path, dataset_dir):
    torch.set_num_threads(1)
    wf = workflow(["train.json", "train_auto.json"], "train", tmp_path, dataset_dir, views_per_image=3, max_epochs=4)
    assert wf.check_properties() == []
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert type(trainer) is SupervisedTrainer and isinstance(trainer.network, FeatureDecoder)
    dataset = wf.parser.get_parsed_content("train#dataset")
    assert isinstance(dataset, EncodedViews) and len(dataset) == 4 * 3
    network = wf.parser.get_parsed_content("network")
    trained = {id(p) for group in wf.parser.get_parsed_content("optimizer").param_groups for p in group["params"]}
    assert trained and not trained & {id(p) for p in network.image_encoder.parameters()}
    losses: dict[int, list[float]] = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda engine: losses.setdefault(engine.state.epoch, []).append(float(engine.state.output[0]["loss"])),
    )
    wf.run()
    assert np.mean(losses[4]) < np.mean(losses[1])  # it learns on the cached windows
    checkpoint = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert checkpoint["network"]["architecture"]["conv_branch"] == "none"

    wf = workflow(["train.json", "evaluate.json", "train_auto.json"], "infer", tmp_path, dataset_dir)
    assert wf.check_properties() == []
    wf.run()
    out = tmp_path / "eval" / "evaluation"
    with open(out / "mean_dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["filename"]).name for r in rows] == ["case5.png", "case6.png"]
    assert all(0 <= float(r["mean"]) <= 1 for r in rows)
    assert 0 <= wf.evaluator.state.metrics["mean_dice"] <= 1


def test_a_network_with_a_conv_branch_trains_on_images(tmp_path, dataset_dir):
    torch.set_num_threads(1)
    overrides = {"network_def#conv_branch": "resnet18", "cache_features": False, "max_epochs": 1, "batch_size": 2}
    wf = workflow(["train.json", "train_auto.json"], "train", tmp_path, dataset_dir, **overrides)
    assert wf.check_properties() == []
    assert not isinstance(wf.parser.get_parsed_content("train#dataset"), EncodedViews)
    wf.run()
    assert wf.trainer.state.iteration == 2 and (tmp_path / "models" / "checkpoint_final.pt").is_file()
    with pytest.raises(Exception) as error:  # the same network with the cache asked for
        workflow(
            ["train.json", "train_auto.json"],
            "train",
            tmp_path / "b",
            dataset_dir,
            **{**overrides, "cache_features": True},
        ).run()
    assert "conv branch is trained" in "".join(str(e) for e in _chain(error.value))


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__
