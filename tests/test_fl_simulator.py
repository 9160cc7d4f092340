"""The real NVIDIA FLARE simulator running this bundle: two sites with their own real slices, two FedAvg rounds.

Small network (ViT-tiny + ResNet18), one or two slices per site, one mask per slice. Each site's datalist lists
slices of its own scan (site-1: brain1, site-2: breast1). ``scripts/fl_simulate.py`` runs in a subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import SMALL_ARCH

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "fl_simulate.py"
SITES = {"site-1": ("brain1", 2), "site-2": ("breast1", 1)}  # site -> (scan, slices): different weights in FedAvg
SMALL = {
    **SMALL_ARCH,
    "batch_size": 1,
    "masks_per_image": 1,
    "num_workers": 0,
    "interactive_iterations": 1,
    "val_interval": 1000,
    "amp": False,
}
TIMEOUT = 420  # seconds per simulator run on a loaded 2-core machine (typically 100-150 s)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fl_data(shared_data_dir, tmp_path_factory):
    """SA-Med2D slices of two real scans, one datalist per site, and the shared starting checkpoint."""
    from bundle.data.convert import Case, convert_to_sa_med2d
    from bundle.networks import SAMUNet

    root = tmp_path_factory.mktemp("fl_data")
    cases = [
        Case(str(shared_data_dir / f"{scan}_image.nrrd"), str(shared_data_dir / f"{scan}_label.nrrd"), scan)
        for scan, _ in SITES.values()
    ]
    convert_to_sa_med2d(
        cases, root / "sa_med2d", "Pyradiomics", fractions=(1.0, 0.0, 0.0), modality="mr", progress=False
    )
    all_images = json.loads((root / "sa_med2d" / "image2label_train.json").read_text())
    sites = []
    for site, (scan, n) in SITES.items():
        own = sorted(k for k in all_images if f"--{scan}--" in k)[:n]
        assert len(own) == n, f"{scan}: expected {n} labelled slices, got {own}"
        (root / "sa_med2d" / f"{site}_train.json").write_text(json.dumps({k: all_images[k][:1] for k in own}))
        (root / "sa_med2d" / f"{site}_val.json").write_text(json.dumps({all_images[k][0]: k for k in own}))
        sites.append(
            {
                "name": site,
                "dataset_dir": "sa_med2d",
                "train_json": f"sa_med2d/{site}_train.json",
                "val_json": f"sa_med2d/{site}_val.json",
            }
        )
    (root / "sites.json").write_text(json.dumps(sites))
    # every site starts from the same checkpoint (the frozen encoder must be identical everywhere)
    torch.manual_seed(0)
    torch.save({"model": SAMUNet("vit_tiny", conv_branch="resnet18").state_dict()}, root / "start.pt")
    return root


def run_simulator(fl_data, workspace, *extra):
    overrides = dict(SMALL, weights=str(fl_data / "start.pt"))
    (workspace.parent / "small.json").write_text(json.dumps(overrides))
    cmd = [sys.executable, str(SCRIPT), "--sites-file", str(fl_data / "sites.json"), "--workspace", str(workspace)]
    cmd += [
        "--rounds",
        "2",
        "--record",
        "--site-threads",
        "1",
        "--overrides-file",
        str(workspace.parent / "small.json"),
        *extra,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=workspace.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    summary_path = workspace / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return proc, summary


def load_records(workspace):
    return {
        p.stem: torch.load(p, map_location="cpu", weights_only=True)
        for p in sorted((workspace / "record").glob("*.pt"))
    }


def expected_global(start, records, rounds, sites):
    """FedAvg by hand: each round adds the average of the sites' weight differences weighted by their local steps."""
    model = {k: v.double() for k, v in start.items()}
    for r in range(rounds):
        updates = [records[f"{s}_round{r}"] for s in sites]
        total = sum(u["stats"]["num_steps"] for u in updates)
        for key in model:
            model[key] = model[key] + sum(u["stats"]["num_steps"] * u["params"][key].double() for u in updates) / total
    return model


def global_model(summary):
    saved = torch.load(summary["global_model"], map_location="cpu", weights_only=True)
    return saved["model"]


def test_two_sites_two_rounds_fedavg(fl_data, tmp_path):
    from bundle.fl.exchange import split_keys, wire_bytes

    workspace = tmp_path / "ws"
    proc, summary = run_simulator(fl_data, workspace)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary and not summary["failed"]

    start = torch.load(fl_data / "start.pt", weights_only=True)["model"]
    trainable, frozen = split_keys(start)
    records = load_records(workspace)
    assert sorted(records) == ["site-1_round0", "site-1_round1", "site-2_round0", "site-2_round1"]
    # both sites trained (steps = their own slices), on identical frozen encoders, and sent only the trainable part
    for site, (_, n_slices) in SITES.items():
        rounds = summary["sites"][site]["rounds"]
        assert [r["round"] for r in rounds] == [0, 1]
        for r in rounds:
            assert r["num_steps"] == n_slices
            assert r["keys_sent"] == r["keys_received"] == len(trainable)
            # within bytes: FLARE's weighted average turns the int64 BN counters into float32 after round 0
            assert abs(r["bytes_sent"] - wire_bytes({k: start[k] for k in trainable})) <= 4 * len(trainable)
        assert summary["sites"][site]["frozen_sha256"].startswith(summary["frozen_sha256"])
        for r in range(2):
            update = records[f"{site}_round{r}"]["params"]
            assert set(update) == set(trainable)
            assert any(update[k].abs().max() > 0 for k in trainable)

    # the server aggregated: its global model is the trainable part, changed, and equal to FedAvg by hand
    final = global_model(summary)
    assert set(final) == set(trainable) and not any(k in final for k in frozen)
    assert max((final[k].double() - start[k].double()).abs().max().item() for k in final) > 1e-4
    expected = expected_global({k: start[k] for k in trainable}, records, 2, SITES)
    for key in final:
        torch.testing.assert_close(final[key].double(), expected[key], rtol=1e-5, atol=1e-5, msg=key)
    # weights 2:1 matter: an unweighted mean would differ
    plain = {k: v.double() for k, v in start.items() if k in final}
    for r in range(2):
        for key in plain:
            plain[key] += sum(records[f"{s}_round{r}"]["params"][key].double() for s in SITES) / 2
    assert max((final[k].double() - plain[k]).abs().max().item() for k in final) > 1e-6
    assert "global model:" in proc.stdout
    # each site keeps its own model after its last round, a bundle checkpoint whose contract names the network
    for site in SITES:
        saved = torch.load(workspace / "sites" / site / "models" / "site_model.pt", weights_only=True)
        assert set(saved) == {"model", "network"} and set(saved["model"]) == set(start)
        assert saved["network"]["architecture"]["backbone"] == "vit_tiny" and saved["network"]["fingerprint"]
    # FLARE's own transfer log: per round the global model to each site and each site's update back
    moved = summary["server_transfers"]
    assert len(moved["sent"]) == len(moved["received"]) == 4
    assert all(
        abs(b - wire_bytes({k: start[k] for k in trainable})) < 0.01 * b for b in moved["sent"] + moved["received"]
    )


def _site_log(workspace, site):
    return "\n".join(p.read_text(errors="replace") for p in (workspace / "sim").rglob("log.txt") if site in str(p))


@pytest.fixture
def missing_site(fl_data, tmp_path):
    """The sites file with site-2's datalist pointing at a file that does not exist."""
    sites = json.loads((fl_data / "sites.json").read_text())
    sites[1]["train_json"] = "sa_med2d/site-2_missing.json"
    for site in sites:
        for key in ("dataset_dir", "train_json", "val_json"):
            site[key] = str(fl_data / site[key])
    path = tmp_path / "sites_missing.json"
    path.write_text(json.dumps(sites))
    return path, str(fl_data / "sa_med2d" / "site-2_missing.json")


def test_missing_datalist_aborts_the_run(fl_data, tmp_path, missing_site):
    sites_file, missing = missing_site
    workspace = tmp_path / "ws"
    proc, summary = run_simulator(fl_data, workspace, "--sites-file", str(sites_file), "--on-site-error", "abort")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    message = f"site site-2: datalist {missing} (train_json) not found"
    assert summary["failed"] and summary["sites"]["site-2"]["error"] == message
    assert f"site-2: FAILED: {message}" in proc.stderr
    assert message in _site_log(workspace, "site-2")
    assert "federated run failed" in proc.stderr


def test_missing_datalist_continues_with_the_other_site(fl_data, tmp_path, missing_site):
    sites_file, missing = missing_site
    workspace = tmp_path / "ws"
    proc, summary = run_simulator(
        fl_data, workspace, "--sites-file", str(sites_file), "--on-site-error", "continue", "--validate"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # --validate: the site evaluates each received global model on its own slices and sends the Dice with its update
    for r in summary["sites"]["site-1"]["rounds"]:
        assert 0.0 <= r["metrics"]["val_mean_dice"] <= 1.0
    message = f"site site-2: datalist {missing} (train_json) not found"
    assert summary["sites"]["site-2"]["error"] == message and summary["sites"]["site-2"]["rounds"] == []
    assert [r["round"] for r in summary["sites"]["site-1"]["rounds"]] == [0, 1]
    assert "Empty result from client site-2, skipping" in "\n".join(
        p.read_text(errors="replace") for p in (workspace / "sim").rglob("log.txt") if "server" in str(p)
    )
    # the global model is FedAvg over site-1 alone
    start = torch.load(fl_data / "start.pt", weights_only=True)["model"]
    records = load_records(workspace)
    assert sorted(records) == ["site-1_round0", "site-1_round1"]
    final = global_model(summary)
    expected = expected_global({k: start[k] for k in final}, records, 2, ["site-1"])
    for key in final:
        torch.testing.assert_close(final[key].double(), expected[key], rtol=1e-5, atol=1e-5, msg=key)
