"""A real learning run: train.json on real MR slices (converted with the bundle's converter) lowers the loss and
raises Dice on held-out slices over the untrained model. Small network (vit_tiny + resnet18 at 128 px), CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from train_helpers import REPO_ROOT, SMALL_NET, convert_brain, write_split


@pytest.mark.slow
def test_training_lowers_loss_and_raises_heldout_dice(tmp_path_factory, tmp_path):
    torch.set_num_threads(1)
    root = convert_brain(tmp_path_factory.getbasetemp())
    train_json, val_json = write_split(root, "learn", train_limit=12, val_limit=8)
    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "train.json"),
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        logging_file=str(REPO_ROOT / "configs" / "logging.conf"),
        workflow_type="train",
        bundle_root=str(tmp_path),
        train_json=str(train_json),
        val_json=str(val_json),
        max_epochs=4,
        batch_size=2,
        val_batch_size=8,
        masks_per_image=1,
        num_workers=0,
        learning_rate=3e-4,  # 1e-3 diverged (loss 18.3 -> 20.0) on the current package set, before and after the change
        lr_milestones=[100],
        prompt_probs={"box": 1.0},
        interactive_iterations=1,
        val_interval=100,
        progress_bar=False,
        seed=0,
        **SMALL_NET,
    )
    workflow.initialize()
    evaluator = workflow.evaluator
    evaluator.run()
    dice_before = evaluator.state.metrics["val_mean_dice"]

    trainer = workflow.trainer
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    workflow.run()
    evaluator.run()
    dice_after = evaluator.state.metrics["val_mean_dice"]
    workflow.finalize()

    assert trainer.state.iteration == 4 * 6 == len(losses)
    first, last = np.mean(losses[:6]), np.mean(losses[-6:])  # first and last epoch
    print(f"loss {first:.3f} -> {last:.3f}; held-out box Dice {dice_before:.3f} -> {dice_after:.3f}")
    assert last < first
    assert dice_after > dice_before + 0.15
    assert (tmp_path / "models" / "checkpoint_final.pt").is_file()
