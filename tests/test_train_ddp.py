"""multi_gpu_train.json under torchrun on CPU (gloo): two ranks train a few iterations and end with identical weights."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import SMALL_NET, convert_brain, run_bundle, write_split


@pytest.mark.slow
def test_torchrun_two_ranks_end_identical(tmp_path_factory, tmp_path):
    root = convert_brain(tmp_path_factory.getbasetemp())
    train_json, val_json = write_split(root, "ddp", train_limit=8, val_limit=2)
    save_ranks = tmp_path / "save_ranks.json"
    save_ranks.write_text(
        json.dumps(
            {
                "run": [
                    "$list(map(lambda h, t=@train#trainer: h.attach(t), @train#checkpoint_handlers))",
                    "$@train#trainer.run()",
                    "$torch.save(@network.state_dict(), @bundle_root + '/rank' + str(dist.get_rank()) + '.pt')",
                ]
            }
        )
    )
    result = run_bundle(
        ["configs/train.json", "configs/multi_gpu_train.json", str(save_ranks)],
        {
            "bundle_root": str(tmp_path),
            "train_json": str(train_json),
            "val_json": str(val_json),
            "max_epochs": 1,
            "batch_size": 2,
            "masks_per_image": 2,
            "num_workers": 0,
            "interactive_iterations": 1,
            "val_interval": 1,
            "progress_bar": False,
            "cache": "none",
            **SMALL_NET,
        },
        torchrun=2,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # parameters and BatchNorm buffers
    from bundle.networks import SAMUNet

    torch.manual_seed(0)
    fresh = SAMUNet("vit_tiny", conv_branch="resnet18", image_size=128).state_dict()
    assert any(not torch.equal(rank0[k], fresh[k]) for k in rank0 if k.startswith("mask_decoder."))
    # 8 images, 2 ranks, batch 2: 2 iterations per rank; the validation ran on both ranks and rank 0 kept model.pt
    assert log.count("train_loss:") == 2
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert set(saved) == {"model", "network", "checkpointer"}  # checkpointer: its best-metric record, for resumes
    assert saved["network"]["architecture"]["backbone"] == "vit_tiny"
