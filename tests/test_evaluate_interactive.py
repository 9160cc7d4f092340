"""scripts/evaluate_interactive.py as users run it: the interactive protocol through inference.json's inferer with
the default weights, on the committed lung1 crop (a 3D CT volume with its label)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundle.io import load_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_protocol_figures_per_step_with_chart(tmp_path, test_data_dir):
    datalist = test_data_dir / "lung1_crop_clicks.json"
    (case,) = json.loads(datalist.read_text())
    out, chart = tmp_path / "clicks.json", tmp_path / "clicks.png"
    command = [sys.executable, "scripts/evaluate_interactive.py", "--datalist", str(datalist), "--steps", "2"]
    command += ["--points", "1", "2", "--variant", "replace", "click_merge=replace", "--variant", "local"]
    command += ["click_merge=local", "--json", str(out), "--chart", str(chart)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("replace", "local"):
        (row,) = record["variants"][name]["rows"]
        summary = record["variants"][name]["summary"]["all"]
        assert len(row["dice"]) == len(row["nsd"]) == 3 and len(row["clicks"]) == 2
        assert row["dice"][0] > 0.6  # the ground truth's box on this lung nodule
        assert all(0 <= d <= 1 for d in row["dice"] + row["nsd"])
        # each click lies in the volume and is labelled by the truth there (a miss: 1, a false positive: 0)
        truth = np.asarray(load_image(str(test_data_dir / case["label"]))[0]) > 0
        for click, label in zip(row["clicks"], row["click_labels"]):
            assert truth[tuple(click)] == bool(label)
        assert summary["auc"] == pytest.approx(
            np.mean([(a + b) / 2 for a, b in zip(row["dice"], row["dice"][1:])]), abs=1e-4
        )
        assert set(summary["points_dice"]) == {"1", "2"}
    # clicks alone with the default click handling: one click finds the nodule, and the next one (on slice 4, which
    # propagation from the first click's slice reaches) corrects that mask instead of starting on slice 4 afresh
    points = record["variants"]["local"]["summary"]["all"]["points_dice"]
    assert points["1"] > 0.65 and points["2"] >= points["1"] - 0.01, points
    assert "| replace |" in run.stdout and "| local |" in run.stdout
