"""Engines: prompt simulation, the trainer's step, the evaluator's rows, loss weights, atomic checkpoints, file checks."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceFocalLoss, DiceLoss
from torchvision.ops import sigmoid_focal_loss

from bundle.data import cached_dataset, check_files
from bundle.engines import (
    AtomicCheckpointSaver,
    InteractiveLoss,
    PromptModeMetric,
    SAMUNetEvaluator,
    SAMUNetTrainer,
    corrective_clicks,
    deepest_clicks,
    initial_prompts,
    parse_mode,
    summarise,
    valid_region,
)
from bundle.networks import SAMUNet
from bundle.transforms import RandSampleMasksd

SIZE = 128


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return SAMUNet("vit_tiny", conv_branch="resnet18", image_size=SIZE)


def disc(cx, cy, r, size=SIZE):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).float()


def batch(n_images=2, empty_second_mask=False):
    torch.manual_seed(3)
    image = torch.randn(n_images, 3, SIZE, SIZE)
    masks = torch.stack([torch.stack([disc(40 + 10 * i, 50, 12), disc(90, 80 + 5 * i, 9)]) for i in range(n_images)])
    if empty_second_mask:
        masks[0, 1] = 0
    return {
        "image": image,
        "label": masks,
        "modality": ["mr"] * n_images,
        "original_hw": torch.tensor([[SIZE, SIZE]] * n_images),
    }


# ------------------------------------------------------------------------------------------------------ prompts
def test_corrective_clicks_follow_the_error_region():
    gt = torch.stack([disc(30, 30, 10), disc(60, 60, 10), disc(60, 60, 10)])[:, None]
    pred = torch.stack([torch.zeros(SIZE, SIZE), disc(60, 60, 10) + disc(100, 20, 6), disc(60, 60, 10)])[:, None] > 0
    g = torch.Generator().manual_seed(0)
    points, labels = corrective_clicks(pred, gt, generator=g)
    assert points.shape == (3, 1, 2) and labels.shape == (3, 1)
    x, y = points[0, 0].long().tolist()
    assert labels[0, 0] == 1 and gt[0, 0, y, x] == 1  # missed foreground -> positive click inside the object
    x, y = points[1, 0].long().tolist()
    assert labels[1, 0] == 0 and pred[1, 0, y, x] and gt[1, 0, y, x] == 0  # false positive -> negative click
    assert labels[2, 0] == -1  # perfect prediction -> padding point


def test_clicks_stay_out_of_padding():
    gt = torch.zeros(4, 1, SIZE, SIZE)
    pred = torch.ones(4, 1, SIZE, SIZE) > 0  # false positives everywhere, padding included
    valid = valid_region(torch.tensor([[SIZE, 40]] * 4), 4, (SIZE, SIZE), "cpu")  # a tall image: 40 columns of content
    points, labels = corrective_clicks(pred, gt, generator=torch.Generator().manual_seed(1), valid=valid)
    assert (labels == 0).all() and (points[..., 0] < 40).all()


def test_corrective_clicks_from_given_uniforms_cover_the_error_region_in_order():
    gt = disc(60, 60, 10)[None, None].repeat(3, 1, 1, 1)
    pred = torch.zeros_like(gt) > 0  # the error region is the disc: a missed object
    error = torch.nonzero(gt[0, 0].flatten()).flatten()
    points, labels = corrective_clicks(pred, gt, uniform=torch.tensor([0.0, 0.5, 0.999999]))
    flat = (points[:, 0, 1] * SIZE + points[:, 0, 0]).long()
    assert flat.tolist() == [int(error[0]), int(error[len(error) // 2]), int(error[-1])]  # inverse CDF, raster order
    assert (labels == 1).all()
    points, labels = corrective_clicks(gt > 0, gt, uniform=torch.tensor([0.3, 0.3, 0.3]))  # no error: padding
    assert (labels == -1).all() and (points == 0).all()


def test_deepest_clicks_are_the_protocol_clicks_and_mix_with_uniform_ones(net):
    from bundle.engines.interactive import _add_click

    gt = torch.stack([disc(60, 60, 10), disc(60, 60, 10), disc(60, 60, 10)])[:, None]
    # a missed disc; a false-positive disc at (100, 30) beside a right mask; nothing wrong
    pred = torch.stack([torch.zeros(SIZE, SIZE), disc(60, 60, 10) + disc(100, 30, 8), disc(60, 60, 10)])[:, None] > 0
    points, labels = deepest_clicks(pred, gt)
    assert points[:2, 0].tolist() == [[60.0, 60.0], [100.0, 30.0]] and labels[:, 0].tolist() == [1, 0, -1]
    valid = torch.ones(3, SIZE, SIZE, dtype=torch.bool)
    valid[:, :, 90:] = False  # the false positive lies in the padding: not an error
    assert deepest_clicks(pred, gt, valid)[1][:, 0].tolist() == [1, -1, -1]

    # in the training loop: numbers below deepest_share get the protocol's click, the others a uniform error pixel
    low = torch.nn.functional.interpolate(torch.where(pred, 20.0, -20.0), size=net.mask_input_size, mode="area")
    index = torch.arange(3)
    uniform = torch.tensor([0.1, 0.9, 0.2])
    xy, lab = _add_click(net, low, gt, index, None, None, None, uniform=uniform, deepest_share=0.5)
    assert xy[0, 0].tolist() == [60.0, 60.0] and lab[:2, 0].tolist() == [1, 0]
    x, y = xy[1, 0].long().tolist()
    assert pred[1, 0, y, x] and not gt[1, 0, y, x]  # uniform (0.9 -> 0.8) over the false positive
    with pytest.raises(ValueError, match="deepest_share"):
        InteractiveLoss(net, lambda a, b: a.mean(), deepest_share=1.0)


def test_initial_prompts_use_the_data_pipeline_samplers():
    import numpy as np

    masks = torch.stack([disc(40, 50, 12), disc(90, 80, 9)])[:, None]
    boxes = initial_prompts(masks, "box", np.random.RandomState(0), jitter=0)["boxes"]
    assert boxes.tolist() == [[28, 38, 52, 62], [81, 71, 99, 89]]
    pts = initial_prompts(masks, "points", np.random.RandomState(0), num_points=3)
    assert pts["points"].shape == (2, 3, 2) and sorted(pts["point_labels"][0].tolist()) == [0, 0, 1]
    with pytest.raises(ValueError, match="empty mask"):
        initial_prompts(torch.zeros(1, 1, SIZE, SIZE), "box", np.random.RandomState(0))


def test_parse_mode():
    assert parse_mode("box") == ("box", 0) and parse_mode("points:3") == ("points", 3)
    assert parse_mode("interactive:5") == ("interactive", 5)
    for bad in ("points", "points:0", "clicks:2", "box:1"):
        with pytest.raises(ValueError, match="prompt mode"):
            parse_mode(bad)


# ------------------------------------------------------------------------------------------------------ loss
def test_dice_focal_loss_matches_reference_recipe():
    """MONAI's focal term with alpha=0.25, gamma=2 is torchvision's sigmoid focal loss (mean); + 20 x soft Dice."""
    torch.manual_seed(0)
    logits, target = torch.randn(3, 1, 16, 16), (torch.rand(3, 1, 16, 16) > 0.7).float()
    loss = DiceFocalLoss(sigmoid=True, gamma=2.0, alpha=0.25, lambda_focal=1.0, lambda_dice=20.0)(logits, target)
    focal = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="mean")
    dice = DiceLoss(sigmoid=True)(logits, target)
    torch.testing.assert_close(loss, focal + 20 * dice)


# ------------------------------------------------------------------------------------------------------ trainer
def _trainer(net, loader, **kwargs):
    params = [p for p in net.parameters() if p.requires_grad]
    return SAMUNetTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.Adam(params, 1e-4),
        loss_function=DiceFocalLoss(sigmoid=True, gamma=2.0, alpha=0.25, lambda_dice=20.0),
        prompt_seed=0,
        **kwargs,
    )


def test_trainer_step_updates_trainable_weights_only(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = _trainer(net, [batch(empty_second_mask=True)], interactive_iterations=2, prompt_probs={"points": 1.0})
    trainer.run()
    out = trainer.state.output[0]
    assert out["num_masks"] == 3 and trainer.empty_masks_skipped == 1  # the empty mask is counted, not trained on
    assert out["step_losses"].shape == (3,) and torch.isfinite(out["loss"])
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("image_encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mask_decoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("conv_branch."))


def test_trainer_encodes_once_per_batch(net, monkeypatch):
    calls = []
    original = net.encode
    monkeypatch.setattr(net, "encode", lambda image, **kw: calls.append(image.shape[0]) or original(image, **kw))
    trainer = _trainer(net, [batch()], interactive_iterations=3)
    trainer.run()
    assert calls == [2]


def test_trainer_rejects_bad_settings(net):
    with pytest.raises(ValueError, match="prompt_probs"):
        _trainer(net, [batch()], prompt_probs={"scribble": 1.0})


# ------------------------------------------------------------------------------------------------------ evaluator
def test_evaluator_scores_every_mode_and_counts_empty_masks(net, tmp_path):
    from bundle.engines import PromptEvaluationReport

    data = batch(empty_second_mask=True)
    data["spacing"] = torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    data["image_id"] = ["a.png", "b.png"]
    modes = ["box", "points:1", "points:3", "interactive:2"]
    evaluator = SAMUNetEvaluator(
        device="cpu",
        val_data_loader=[data],
        network=net,
        prompt_modes=modes,
        key_val_metric={"dice_box": PromptModeMetric("box")},
        additional_metrics={"nsd_interactive": PromptModeMetric("interactive:2", "nsd")},
        val_handlers=[PromptEvaluationReport(str(tmp_path), worst_k=2)],
    )
    evaluator.run()
    rows = evaluator.state.output["rows"]
    assert len(rows) == 4 * len(modes)
    empty = [r for r in rows if r["status"] == "empty_mask"]
    assert len(empty) == len(modes) and all(math.isnan(r["dice"]) for r in empty)
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(0 <= r["dice"] <= 1 and 0 <= r["nsd"] <= 1 for r in ok)
    assert 0 <= evaluator.state.metrics["dice_box"] <= 1
    summary = {(s["modality"], s["mode"]): s for s in evaluator.state.prompt_summary}
    assert summary[("all", "box")]["n_masks"] == 4 and summary[("all", "box")]["n_empty"] == 1
    assert summary[("all", "box")]["n_evaluated"] == 3
    for name in ("per_mask.csv", "summary.csv", "summary.json", "dice_by_modality_mode.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(list((tmp_path / "worst").glob("*.png"))) == 2 * len(modes)


def test_worst_case_overlay_keeps_its_title_inside_and_draws_the_prompt(net, tmp_path):
    """The overlays of evaluate.json: a long image path gives a readable title within the picture, and the prompt
    (box, or foreground / background clicks) is drawn."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from bundle.engines import PromptEvaluationReport
    from bundle.engines.handlers import overlay_figure, overlay_title

    data = batch()
    data["image_id"] = ["/data/sa_med2d/masks/mr_00--MyDataset--brain1_crop_image--z_0003--0001_000.png"] * 2
    evaluator = SAMUNetEvaluator(
        device="cpu",
        val_data_loader=[data],
        network=net,
        prompt_modes=["box", "points:3"],
        val_handlers=[PromptEvaluationReport(str(tmp_path), worst_k=1)],
    )
    evaluator.run()
    keep, _, prompt = evaluator.state.output["cases"]["points:3"]
    assert prompt["points"].shape == (len(keep), 3, 2)
    pngs = sorted((tmp_path / "worst").glob("*.png"))
    assert [p.name.split("_")[0] for p in pngs] == ["box", "points"] and "masks" not in pngs[0].name

    grey, mask = np.zeros((64, 64), np.uint8), np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    title = overlay_title(Path(data["image_id"][0]).name + " mask 0", "interactive:5", {"dice": 0.51, "nsd": 0.7})
    for prompt, drawn in (
        ({"boxes": [10, 20, 29, 39]}, Rectangle),
        ({"points": [[15, 25], [1, 1]], "point_labels": [1, 0]}, Line2D),
    ):
        figure = overlay_figure(grey, mask, mask, title, prompt)
        figure.canvas.draw()
        ax = figure.axes[0]
        box = ax.title.get_window_extent(figure.canvas.get_renderer())
        assert box.x0 >= 0 and box.x1 <= figure.bbox.x1 and box.y1 <= figure.bbox.y1, (box, figure.bbox)
        assert any(isinstance(a, drawn) for a in ax.patches + ax.lines)


def test_evaluator_is_repeatable(net):
    def run():
        evaluator = SAMUNetEvaluator(
            device="cpu", val_data_loader=[batch()], network=net, prompt_modes=["points:3", "interactive:1"]
        )
        evaluator.run()
        return [(r["mode"], r["dice"]) for r in evaluator.state.output["rows"]]

    assert run() == run()


def test_summarise_keeps_empty_masks_visible():
    rows = [
        {"modality": "ct", "mode": "box", "status": "ok", "dice": 0.8, "nsd": 0.9},
        {"modality": "ct", "mode": "box", "status": "empty_mask", "dice": math.nan, "nsd": math.nan},
        {"modality": "mr", "mode": "box", "status": "ok", "dice": 0.6, "nsd": 0.7},
    ]
    by_key = {(s["modality"], s["mode"]): s for s in summarise(rows)}
    assert by_key[("ct", "box")]["n_empty"] == 1 and by_key[("ct", "box")]["dice_mean"] == pytest.approx(0.8)
    assert by_key[("all", "box")]["n_masks"] == 3 and by_key[("all", "box")]["dice_mean"] == pytest.approx(0.7)


# ------------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A save that dies half-way (here: torch.save raising after writing part of the file) leaves the previous
    model.pt intact and no partial file behind: ignite's DiskSaver(atomic=True) writes a temp file and renames."""
    from ignite.engine import Engine

    model = torch.nn.Linear(4, 2)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": model}, save_final=True, final_filename="model.pt")
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    good = torch.load(tmp_path / "model.pt", weights_only=True, map_location="cpu")
    assert set(good) == {"model"}

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(torch, "save", dying_save)
    with torch.no_grad():
        model.weight.add_(1.0)
    engine.state.iteration += 1  # a later, better "final" checkpoint, so ignite tries to write it
    with pytest.raises(KeyboardInterrupt):
        saver._final_checkpoint(engine)
    monkeypatch.setattr(torch, "save", real_save)
    again = torch.load(tmp_path / "model.pt", weights_only=True, map_location="cpu")
    torch.testing.assert_close(again["model"]["weight"], good["model"]["weight"])
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_interval_checkpoint_has_a_fixed_name(tmp_path):
    from ignite.engine import Engine

    model = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(
        str(tmp_path),
        {"model": model},
        save_interval=2,
        epoch_level=False,
        interval_filename="checkpoint_last.pt",
        n_saved=1,
    )
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run(range(5), max_epochs=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_last.pt"]


def test_a_resumed_run_replaces_the_best_model_only_with_a_better_one(tmp_path):
    """The best val Dice so far is saved with model.pt; a saver of a resumed run (``resume_key_metric``, what
    train.json sets from ``--resume``) continues from it: 0.760 after 0.772 keeps the old model, 0.780 replaces it."""
    from ignite.engine import Engine, Events

    def validate(model, dice, resume):
        saver = AtomicCheckpointSaver(
            str(tmp_path),
            {"model": model},
            save_key_metric=True,
            key_metric_name="val_mean_dice",
            key_metric_filename="model.pt",
            resume_key_metric=resume,
        )
        evaluator = Engine(lambda e, b: None)

        @evaluator.on(Events.EPOCH_COMPLETED)
        def score(engine):
            engine.state.metrics["val_mean_dice"] = dice

        saver.attach(evaluator)
        evaluator.run([0], max_epochs=1)
        return torch.load(tmp_path / "model.pt", weights_only=True, map_location="cpu")["model"]["weight"]

    first, worse, better = (torch.nn.Linear(2, 2) for _ in range(3))
    torch.testing.assert_close(validate(first, 0.772, resume=False), first.weight)
    torch.testing.assert_close(validate(worse, 0.760, resume=True), first.weight)  # kept
    torch.testing.assert_close(validate(better, 0.780, resume=True), better.weight)
    torch.testing.assert_close(validate(worse, 0.700, resume=False), worse.weight)  # a new run starts afresh
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


# ------------------------------------------------------------------------------------------------------ data glue
def test_check_files_names_the_missing_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    check_files([{"image": str(tmp_path / "a.png"), "label": []}])
    with pytest.raises(FileNotFoundError, match="missing_mask.png"):
        check_files([{"image": "a.png", "label": ["missing_mask.png"]}], base_dir=tmp_path)


def test_rand_select_masks_and_cache_choice(tmp_path):
    t = RandSampleMasksd("label", k=3)
    t.set_random_state(0)
    out = t({"label": torch.arange(2)[:, None, None].expand(2, 4, 4).float()})
    assert out["label"].shape == (3, 4, 4)
    data = [{"x": 1}]
    assert type(cached_dataset(data, None, "none")).__name__ == "Dataset"
    assert type(cached_dataset(data, None, "memory")).__name__ == "CacheDataset"
    assert type(cached_dataset(data, None, "persistent", cache_dir=tmp_path / "c")).__name__ == "PersistentDataset"
    with pytest.raises(ValueError, match="cache"):
        cached_dataset(data, None, "disk")
