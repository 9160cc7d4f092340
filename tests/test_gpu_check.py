"""``scripts/gpu_check.sh`` as a user runs it, here without CUDA: every step runs, the CUDA tests skip saying why, and
one folder holds the summary, the log and each benchmark's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script measures for minutes; run it by hand"),
]


def test_gpu_check_without_cuda_runs_every_step_and_writes_one_folder(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:] + (out / "gpu_check.log").read_text()[-3000:]
    assert "no CUDA device here" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["goal_met"] is None
    steps = ["cuda_tests", "throughput_vit_b", "throughput_litemedsam", "train_amp"]
    assert [s["step"] for s in summary["steps"]] == steps
    assert all(s["exit"] == 0 for s in summary["steps"])
    tests = summary["cuda_tests"]
    assert tests["tests"] >= 6 and tests["skipped"] == tests["tests"] and tests["failures"] == tests["errors"] == 0
    assert any("CUDA" in reason for reason in tests["skip_reasons"])
    for name in ("throughput_vit_b", "throughput_litemedsam"):
        rows = summary[name]["rows"]
        assert {(r["dtype"], r["batch"]) for r in rows} == {(d, b) for d in ("fp32", "bf16") for b in (1,)}
        assert all(r["slices_per_s"] > 0 for r in rows)
    assert summary["vit_b_bf16_best"]["ratio_to_fp32"] > 0
    assert summary["train"]["results"][0]["masks_per_s"] > 0
    assert (out / "gpu_check.log").stat().st_size > 0
