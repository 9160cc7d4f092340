"""Faults: a training run killed mid-epoch resumes from its last checkpoint and ends at the same total iteration
count; checkpoints read while the run writes them (and after the kill) are never truncated (atomic writes); a time
limit stops a run cleanly with its final checkpoint."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import time

import pytest
import torch
from train_helpers import PYTHON, REPO_ROOT, SMALL_NET, bundle_args, convert_brain, env_one_thread, write_split

EPOCHS, PER_EPOCH = 2, 3  # 6 training images, batch 2: killed inside epoch 2


def _command(tmp_path, train_json, val_json, resume: bool, **extra):
    overrides = {
        "bundle_root": str(tmp_path),
        "train_json": str(train_json),
        "val_json": str(val_json),
        "max_epochs": EPOCHS,
        "batch_size": 2,
        "masks_per_image": 1,
        "num_workers": 0,
        "interactive_iterations": 1,
        "checkpoint_interval": 1,
        "val_interval": 100,
        "progress_bar": False,
        "cache": "none",
        "resume": resume,
        **SMALL_NET,
        **extra,
    }
    return [PYTHON, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", *bundle_args(overrides)]


def _iteration(path):
    return int(torch.load(path, weights_only=True, map_location="cpu")["trainer"]["iteration"])


def _best_record(path) -> tuple[float, str]:
    """The best val score model.pt was saved with, and a digest of its weights."""
    best = torch.load(path, weights_only=True, map_location="cpu")
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in best["model"].values())).hexdigest()
    return float(best["checkpointer"]["_saved"][-1][0]), digest


def _losses(log: str) -> dict[tuple[int, int], str]:
    """(epoch, iteration in epoch) -> the train loss StatsHandler printed."""
    return {
        (int(e), int(i)): v for e, i, v in re.findall(r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- train_loss: (\S+)", log)
    }


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses_and_keeps_its_best_model(tmp_path_factory, tmp_path):
    root = convert_brain(tmp_path_factory.getbasetemp())
    train_json, val_json = write_split(root, "faults", train_limit=6, val_limit=2)
    last = tmp_path / "models" / "checkpoint_last.pt"
    # the uninterrupted run, beside the one that is killed (one thread each)
    reference_log = tmp_path / "reference.log"
    reference = subprocess.Popen(
        _command(tmp_path / "reference", train_json, val_json, resume=False, val_interval=1),
        cwd=REPO_ROOT,
        env=env_one_thread(),
        stdout=reference_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        proc = subprocess.Popen(
            _command(tmp_path, train_json, val_json, resume=False, val_interval=1),
            cwd=REPO_ROOT,
            env=env_one_thread(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen, deadline = [], time.time() + 400
        try:
            while time.time() < deadline and proc.poll() is None:
                if last.exists():
                    seen.append(_iteration(last))  # read while the trainer rewrites it: always a complete file
                    if seen[-1] > PER_EPOCH and seen[-1] % PER_EPOCH:  # inside epoch 2
                        proc.send_signal(signal.SIGKILL)
                        break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            output = proc.communicate(timeout=60)[0]
        assert proc.returncode == -signal.SIGKILL, output[-3000:]
        killed_at = _iteration(last)  # the checkpoint a kill left behind loads
        assert PER_EPOCH < killed_at < EPOCHS * PER_EPOCH
        assert not (tmp_path / "models" / "checkpoint_final.pt").exists()
        # a kill during a write can at most leave a hidden temporary file beside it, never a partial checkpoint name
        assert all(".tmp-" in p.name or p.suffix == ".pt" for p in last.parent.iterdir())
        best_score, best_digest = _best_record(last.parent / "model.pt")  # validated after epoch 1
        partial = last.parent / ".checkpoint_last.tmp-0123abcd.pt"  # what a kill inside torch.save leaves
        partial.write_bytes(b"PK\x03\x04 partial")

        resumed = subprocess.run(
            _command(tmp_path, train_json, val_json, resume=True, val_interval=1),
            cwd=REPO_ROOT,
            env=env_one_thread(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert not [p.name for p in last.parent.iterdir() if ".tmp-" in p.name]  # the resumed run removed the litter
        # model.pt is still the best model: the epoch-2 validation replaced it only if it scored higher
        score, digest = _best_record(last.parent / "model.pt")
        assert (score, digest) == (best_score, best_digest) or score > best_score, (best_score, score)
        final = torch.load(tmp_path / "models" / "checkpoint_final.pt", weights_only=True, map_location="cpu")
        assert final["trainer"]["iteration"] == EPOCHS * PER_EPOCH
        assert final["trainer"]["max_epochs"] == EPOCHS and final["trainer"]["epoch_length"] == PER_EPOCH
        assert set(final) == {"model", "network", "optimizer", "lr_scheduler", "trainer"}  # the model contract too
        assert final["network"]["architecture"]["backbone"] == "vit_tiny" and final["network"]["fingerprint"]
        log = resumed.stdout + resumed.stderr
        assert "Restored all variables from" in log and "checkpoint_last.pt" in log, log[-3000:]
        assert f"resumed the best-metric record of {last.parent / 'model.pt'}" in log, log[-3000:]
        # only the remaining iterations ran after the resume, starting inside the interrupted epoch
        assert log.count("train_loss:") == EPOCHS * PER_EPOCH - killed_at, log[-3000:]
        assert f"Epoch: 2/{EPOCHS}, Iter: {killed_at - PER_EPOCH + 1}/{PER_EPOCH}" in log, log[-3000:]
        # ... on the batches, augmentations and prompts of the uninterrupted run: the same losses
        reference.wait(timeout=600)
        assert reference.returncode == 0, reference_log.read_text()[-3000:]
        expected = {
            k: v for k, v in _losses(reference_log.read_text()).items() if (k[0] - 1) * PER_EPOCH + k[1] > killed_at
        }
        assert len(expected) == EPOCHS * PER_EPOCH - killed_at and _losses(log) == expected, (_losses(log), expected)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()


@pytest.mark.slow
def test_time_limit_stops_training_and_writes_the_final_checkpoint(tmp_path_factory, tmp_path):
    root = convert_brain(tmp_path_factory.getbasetemp())
    train_json, val_json = write_split(root, "time_limit", train_limit=6, val_limit=2)
    command = _command(tmp_path, train_json, val_json, resume=False, max_epochs=1000, time_limit=2)
    done = subprocess.run(command, cwd=REPO_ROOT, env=env_one_thread(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Reached the time limit: 2 sec" in done.stdout + done.stderr
    final = torch.load(tmp_path / "models" / "checkpoint_final.pt", weights_only=True, map_location="cpu")
    assert 1 <= final["trainer"]["iteration"] < 1000 * PER_EPOCH
