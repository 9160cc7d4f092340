"""The bundle as MONAI tools see it: metadata, verify_net_in_out, ConfigWorkflow properties, large-file list (the
documented verify_net_in_out command of configs/inference.json runs in test_docs.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigWorkflow

ROOT = Path(__file__).resolve().parents[1]


def test_metadata_declares_network_io_and_versions():
    meta = json.loads((ROOT / "configs/metadata.json").read_text())
    assert list(meta["network_data_format"]["inputs"])[0] == "image"
    assert list(meta["network_data_format"]["outputs"])[0] == "pred"
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["num_channels"], image["spatial_shape"]) == (3, [256, 256])
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert (pred["num_channels"], pred["spatial_shape"]) == (1, [256, 256])
    assert meta["version"] in meta["changelog"]
    constraints = (ROOT / "constraints.txt").read_text()
    assert f"monai=={meta['monai_version']}" in constraints
    assert f"torch=={meta['pytorch_version']}" in constraints


@pytest.mark.parametrize("config", ["configs/inference_auto.json"])
def test_verify_net_in_out_runs_as_users_run_it(config):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_net_in_out",
            "network_def",
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            config,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "data shape of network is verified with no error" in run.stdout + run.stderr


def test_metadata_reports_the_default_models_measured_figures_and_the_monai_label_app():
    """eval_metrics are the figures docs/benchmarks.md measured for the default weights, not the paper's."""
    meta = json.loads((ROOT / "configs/metadata.json").read_text())
    record = (ROOT / "docs" / "benchmarks.md").read_text()
    dice, nsd = re.search(r"\| \*\*all slices\*\* \| 13 \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \|", record).groups()
    assert meta["eval_metrics"] == {"mean_dice": float(dice), "mean_nsd_2mm": float(nsd)}
    assert (
        "LiteMedSAM" in meta["eval_data"] and "lung1" in meta["eval_data"] and "docs/benchmarks.md" in meta["eval_data"]
    )
    assert "monailabel" in meta["supported_apps"] and (ROOT / "bundle" / "label" / "app" / "main.py").is_file()
    readme = (ROOT / "docs" / "README.md").read_text()
    assert "## Default model" in readme and f"**{dice}**" in readme and f"**{nsd}**" in readme


def test_inference_config_has_the_properties_monai_requires():
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs/inference.json"),
        meta_file=str(ROOT / "configs/metadata.json"),
        workflow_type="infer",
        logging_file=None,
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])


def test_large_files_list_names_the_official_sam_checkpoint():
    large = yaml.safe_load((ROOT / "models/large_files.yml").read_text())
    entry = next(item for item in large["large_files"] if item["path"].endswith("sam_vit_b_01ec64.pth"))
    assert entry["hash_val"] == "01ec64d29a2fca3f0661936605ae66f8" and entry["hash_type"] == "md5"


def test_vit_b_override_switches_inference_and_training_to_the_papers_network(tmp_path):
    import pytest
    from monai.bundle import ConfigParser

    for base in ("inference.json", "train.json"):
        parser = ConfigParser()
        parser.read_config([str(ROOT / "configs" / base), str(ROOT / "configs" / "vit_b.json")])
        parser["bundle_root"] = str(tmp_path)
        net_def = parser["network_def"]
        assert {k: net_def[k] for k in ("backbone", "image_size", "conv_branch", "fusion", "decoder_tokens")} == {
            "backbone": "vit_b",
            "image_size": 256,
            "conv_branch": "resnet34",
            "fusion": True,
            "decoder_tokens": "med",
        }
        assert parser.get_parsed_content("pixel_normalization") == "sam"
        assert parser.get_parsed_content("weights") == f"{tmp_path}/models/sam_unet_vit_b.pt"
        if base == "train.json":  # ViT-B's measured memory defaults (docs/benchmarks.md, Training memory)
            assert parser["checkpoint_activations"] is False and parser["decoder_batch"] is None
            assert parser["train#trainer#checkpoint_activations"] == "@checkpoint_activations"
        with pytest.raises(RuntimeError) as error:  # a weight file the user has not supplied yet
            parser.get_parsed_content("network_def")
        assert "sam_unet_vit_b.pt" in str(error.value.__cause__)  # MONAI wraps the loader's error
    parser["weights"] = ""
    net = parser.get_parsed_content("network_def")
    assert net.config == {
        "backbone": "vit_b",
        "image_size": 256,
        "conv_branch": "resnet34",
        "fusion": True,
        "decoder_tokens": "med",
    }
    assert sum(p.numel() for p in net.parameters()) == 116_019_884
