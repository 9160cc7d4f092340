#!/usr/bin/env python
"""Gather what ``scripts/gpu_check.sh`` wrote into ``OUT/summary.json`` and print markdown rows for docs/benchmarks.md.

    python scripts/gpu_check_summary.py OUT DEVICE

Exit status 1 when a step failed (or a CUDA test failed), else 0.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

#: bf16 encoder throughput goal of ViT-B SAM-UNet at its best batch size on an H100-class GPU
GOAL_SLICES_PER_S = 2000.0


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def test_counts(junit: Path) -> dict | None:
    if not junit.is_file():
        return None
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["skip_reasons"] = sorted({s.get("message", "") for s in suite.iter("skipped")})
    return counts


def best_bf16(throughput: dict | None) -> dict | None:
    """The best bf16 row and its ratio to fp32 at the same batch size."""
    rows = [r for r in (throughput or {}).get("rows", []) if "slices_per_s" in r]
    bf16 = [r for r in rows if r["dtype"] == "bf16"]
    if not bf16:
        return None
    best = max(bf16, key=lambda r: r["slices_per_s"])
    fp32 = next((r for r in rows if r["dtype"] == "fp32" and r["batch"] == best["batch"]), None)
    return {
        "batch": best["batch"],
        "slices_per_s": best["slices_per_s"],
        "ratio_to_fp32": best["slices_per_s"] / fp32["slices_per_s"] if fp32 else None,
    }


def driver_version() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def main(argv: list[str]) -> int:
    out, device = Path(argv[0]), argv[1]
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        steps.append({"step": name, "exit": int(rc), "seconds": int(seconds), "timed_out": rc in ("124", "137")})
    import torch

    vit_b = read_json(out / "throughput_vit_b.json")
    bf16 = best_bf16(vit_b)
    summary = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "nvidia_smi": driver_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "steps": steps,
        "cuda_tests": test_counts(out / "cuda_tests.xml"),
        "throughput_vit_b": vit_b,
        "throughput_litemedsam": read_json(out / "throughput_litemedsam.json"),
        "train": read_json(out / "train.json"),
        "compile": read_json(out / "compile.json"),
        "vit_b_bf16_best": bf16,
        "goal_slices_per_s": GOAL_SLICES_PER_S,
        "goal_met": bool(bf16 and bf16["slices_per_s"] >= GOAL_SLICES_PER_S) if device == "cuda" else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for s in steps:
        print(f"| {s['step']} | exit {s['exit']}{' (time limit)' if s['timed_out'] else ''} | {s['seconds']} s |")
    if bf16:
        ratio = f"{bf16['ratio_to_fp32']:.2f}x fp32" if bf16["ratio_to_fp32"] else "no fp32 row"
        print(f"ViT-B SAM-UNet bf16: {bf16['slices_per_s']:.0f} slices/s at batch {bf16['batch']} ({ratio})")
    print(f"summary: {out / 'summary.json'}")
    tests = summary["cuda_tests"] or {}
    failed = any(s["exit"] != 0 for s in steps) or tests.get("failures", 0) or tests.get("errors", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
