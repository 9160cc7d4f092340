"""train.json / evaluate.json: MONAI's property checks, the MONAI FL contract, a missing datalist file, evaluation output."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from train_helpers import REPO_ROOT, SMALL_NET, convert_brain, workflow, write_split

CONFIGS = REPO_ROOT / "configs"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = convert_brain(tmp_path_factory.getbasetemp())
    return write_split(root, "config", train_limit=4, val_limit=3)


def test_train_config_properties_and_fl_contract(split, tmp_path):
    train_json, val_json = split
    wf = workflow(["train.json"], "train", tmp_path, train_json=str(train_json), val_json=str(val_json))
    wf.initialize()
    assert wf.check_properties() == []
    assert isinstance(wf.parser.get_parsed_content("train#trainer"), SupervisedTrainer)  # MONAI FL MonaiAlgo
    assert isinstance(wf.parser.get_parsed_content("validate#evaluator"), SupervisedEvaluator)
    for key in ("train#trainer#max_epochs", "train#dataset#data", "train#inferer", "train#handlers", "val_interval"):
        assert key in wf.parser, key
    trainable = sum(
        p.numel() for group in wf.parser.get_parsed_content("optimizer").param_groups for p in group["params"]
    )
    net = wf.parser.get_parsed_content("network")
    assert (
        trainable
        == sum(p.numel() for p in net.parameters() if p.requires_grad)
        < sum(p.numel() for p in net.parameters())
    )


@pytest.mark.parametrize("workflow_type", ["train", "infer"])
def test_evaluate_config_properties(split, tmp_path, workflow_type):
    train_json, val_json = split
    wf = workflow(
        ["train.json", "evaluate.json"],
        workflow_type,
        tmp_path,
        train_json=str(train_json),
        val_json=str(val_json),
        test_json=str(val_json),
        ckpt_path=None,
    )
    wf.initialize()
    assert wf.check_properties() == []


def test_evaluate_writes_reports(split, tmp_path):
    _, val_json = split
    torch.manual_seed(0)
    from bundle.networks import SAMUNet

    ckpt = tmp_path / "model.pt"
    torch.save({"model": SAMUNet("vit_tiny", conv_branch="resnet18", image_size=128).state_dict()}, ckpt)
    wf = workflow(
        ["train.json", "evaluate.json"],
        "infer",
        tmp_path,
        train_json=str(val_json).replace("_val", "_train"),
        val_json=str(val_json),
        test_json=str(val_json),
        ckpt_path=str(ckpt),
        eval_prompt_modes=["box", "points:1", "points:3", "interactive:2"],
        worst_k=1,
    )
    wf.initialize()
    wf.run()
    out = tmp_path / "eval" / "evaluation"
    summary = json.loads((out / "summary.json").read_text())
    modes = {s["mode"] for s in summary["summary"]}
    assert modes == {"box", "points:1", "points:3", "interactive:2"}
    overall = [s for s in summary["summary"] if s["modality"] == "all"]
    assert all(s["n_masks"] == 3 and s["n_evaluated"] + s["n_empty"] == 3 for s in overall)
    assert summary["nsd_tolerance_mm"] == 2.0
    for name in ("per_mask.csv", "summary.csv", "dice_by_modality_mode.png", "metrics.csv"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "worst").glob("*.png"))) == 4
    assert 0 <= wf.evaluator.state.metrics["mean_dice"] <= 1
    assert "nsd_interactive_2" in wf.evaluator.state.metrics


def test_missing_datalist_file_fails_before_training(split, tmp_path):
    train_json, val_json = split
    items = json.loads(train_json.read_text())
    first = next(iter(items))
    items[first] = items[first] + ["masks/no_such_mask--0001_000.png"]
    bad = tmp_path / "bad_train.json"
    bad.write_text(
        json.dumps({str(train_json.parent / k): [str(train_json.parent / m) for m in v] for k, v in items.items()})
    )
    wf = workflow(["train.json"], "train", tmp_path, train_json=str(bad), val_json=str(val_json))
    wf.initialize()
    with pytest.raises(Exception) as err:
        wf.run()
    assert "no_such_mask--0001_000.png" in "".join(str(e) for e in _chain(err.value))
    assert not (tmp_path / "models" / "checkpoint_final.pt").exists()


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_volume_datalist_trains_on_slices_cut_in_memory(tmp_path):
    data = (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not (data / "breast1_image.nrrd").is_file():
        pytest.skip("real scans not found")
    volumes = tmp_path / "volumes.json"
    volumes.write_text(
        json.dumps(
            [{"image": str(data / "breast1_image.nrrd"), "label": str(data / "breast1_label.nrrd"), "modality": "mr"}]
        )
    )
    wf = workflow(
        ["train.json", "train_volumes.json"],
        "train",
        tmp_path,
        train_volumes=str(volumes),
        val_volumes=str(volumes),
        slice_axes=["z", "x"],
        max_epochs=1,
        epoch_length=2,
        batch_size=2,
        masks_per_image=1,
        interactive_iterations=1,
        cache="none",
    )
    wf.initialize()
    assert wf.check_properties() == []
    items = wf.parser.get_parsed_content("train#datalist")
    assert all(it["modality"] == "mr" and it["spacing"].shape == (2,) for it in items)
    torch.set_num_threads(1)
    wf.run()
    assert wf.trainer.state.iteration == 2
    assert (
        tmp_path / "models" / "model.pt"
    ).is_file()  # validation ran on the in-memory slices and kept the best model

    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"image": str(data / "breast1_image.nrrd"), "label": "no_such_label.nrrd"}]))
    wf = workflow(
        ["train.json", "train_volumes.json"],
        "train",
        tmp_path / "m",
        train_volumes=str(missing),
        val_volumes=str(volumes),
    )
    wf.initialize()
    with pytest.raises(Exception) as err:
        wf.run()
    assert "no_such_label.nrrd" in "".join(str(e) for e in _chain(err.value))


@pytest.mark.slow
def test_tracking_mlflow(split, tmp_path):
    pytest.importorskip("mlflow")
    train_json, val_json = split
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        tracking="mlflow",
        bundle_root=str(tmp_path),
        num_workers=0,
        progress_bar=False,
        train_json=str(train_json),
        val_json=str(val_json),
        max_epochs=1,
        epoch_length=1,
        batch_size=2,
        masks_per_image=1,
        interactive_iterations=0,
        cache="none",
        **SMALL_NET,
    )
    wf.initialize()
    torch.set_num_threads(1)
    wf.run()
    wf.finalize()
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=wf.parser.get_parsed_content("tracking_uri"))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = {k for run in runs for k in run.data.metrics}
    assert {"train_loss", "val_mean_dice"} <= metrics
