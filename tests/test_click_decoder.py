"""scripts/train_click_decoder.py: the decoder fine-tuned on cached embeddings is a small checkpoint that loads on
top of LiteMedSAM, and says what it was trained for. Real LiteMedSAM weights, the committed hc18 images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def hc18_datalist(test_data_dir, folder: Path) -> str:
    """The four committed hc18 ultrasound images as a datalist of the protocol scripts (one dataset)."""
    images = sorted((test_data_dir / "hc18_small").glob("*_HC.png"))
    items = [
        {"image": str(p), "label": str(p.with_name(p.stem + "_mask.png")), "modality": "ultrasound"} for p in images
    ]
    path = folder / "hc18_small.json"
    path.write_text(json.dumps([dict(item, dataset="hc18_small") for item in items]))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, test_data_dir):
    import train_click_decoder

    folder = tmp_path_factory.mktemp("click_decoder")
    out = folder / "clicks.pt"
    argv = ["--datalist", hc18_datalist(test_data_dir, folder), "--steps", "2", "--batch", "2"]
    argv += ["--iterations", "1", "--lr", "1e-3", "--threads", "1", "--no_progress", "--output", str(out)]
    assert train_click_decoder.main(argv) == 0
    return out


def test_decoder_checkpoint_is_small_and_loads_on_litemedsam(trained):
    from bundle.inferers import PromptedSliceInferer
    from bundle.networks import SAMUNet

    saved = torch.load(trained, map_location="cpu", weights_only=True)
    assert trained.stat().st_size < 10 * 2**20
    assert saved["network"]["base_weights"] == "litemedsam"
    assert all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in saved["model"])
    assert {v.dtype for v in saved["model"].values() if v.is_floating_point()} == {torch.float16}

    net, base = SAMUNet(weights=str(trained)), SAMUNet(weights="litemedsam")
    state, base_state = net.state_dict(), base.state_dict()
    changed = 0
    for key, value in state.items():
        if key in saved["model"]:
            torch.testing.assert_close(value, saved["model"][key].to(value.dtype))
            changed += not torch.equal(value, base_state[key])
        else:  # the frozen encoder: LiteMedSAM's own
            torch.testing.assert_close(value, base_state[key], rtol=0, atol=0)
    assert changed > 0  # two optimiser steps moved the decoder
    assert net.trained_prompts == ("box", "points", "mask")
    assert PromptedSliceInferer(net).uses_feedback() and not PromptedSliceInferer(base).uses_feedback()

    record = json.loads(trained.with_suffix(".json").read_text())
    assert record["cases"] == 4 and record["slices"] == 4 and len(record["losses"]) == 2
    assert record["s_per_step"] > 0 and record["peak_rss_gib"] > 0 and record["datasets"] == ["hc18_small"]


def test_unknown_base_weights_and_an_empty_training_set_are_refused(tmp_path, trained, test_data_dir):
    import train_click_decoder

    from bundle.networks import SAMUNet

    saved = torch.load(trained, map_location="cpu", weights_only=True)
    saved["network"]["base_weights"] = "medsam_huge"
    torch.save(saved, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="unknown base_weights 'medsam_huge'"):
        SAMUNet(weights=str(tmp_path / "odd.pt"))
    datalist = hc18_datalist(test_data_dir, tmp_path)
    with pytest.raises(SystemExit, match="no training cases"):
        train_click_decoder.main(
            ["--datalist", datalist, "--holdout", "hc18_small", "--output", str(tmp_path / "x.pt")]
        )
