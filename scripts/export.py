#!/usr/bin/env python
"""Export the bundle's network to ONNX: ``encoder.onnx`` (image encoder) and ``decoder.onnx`` (prompt encoder + mask
decoder), for ONNX Runtime (``configs/inference_onnx.json``) or other runtimes.

    python scripts/export.py                                   # the default network (LiteMedSAM) -> models/
    python scripts/export.py --checkpoint models/model.pt      # a trained model (its checkpoint names its network)
    python scripts/export.py --checkpoint sam_unet.pt --network_def#backbone vit_b ...   # any config id override

The network is the one the checkpoint's model contract names, with any argument ``network_def`` of ``--config`` sets
(config ids can be overridden as with ``monai.bundle``: ``--id value``); its weights come from ``--checkpoint``
(default: the config's ``weights``) and must match it exactly: a checkpoint with missing, unexpected or differently
shaped parameters stops the export with the keys named, and no file is written. Before the files are put in place, they are run in ONNX Runtime on real slices of
``--check-image`` (default: the lung CT crop in tests/data) and compared with PyTorch; a logit difference above
``--atol`` (1e-3) also writes nothing. Both files carry the bundle's name and version, the network configuration,
its model contract (with the pixel normalisation the weights expect) and a shared weights fingerprint as ONNX
metadata.

For TorchScript use MONAI's own command (the bundle's ``export_network`` id)::

    python -m monai.bundle ckpt_export export_network --config_file configs/inference.json \\
        --ckpt_file models/model.pt --filepath models/model.ts
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CHECK_IMAGE = ROOT / "tests" / "data" / "lung1_crop_image.nrrd"


def parse_overrides(extra: list[str]) -> dict[str, object]:
    """``--id value`` pairs (values parsed as JSON where they can be, as ``monai.bundle`` does via fire)."""
    if len(extra) % 2 or not all(k.startswith("--") for k in extra[::2]):
        raise SystemExit(f"config overrides must be --id value pairs, got {extra}")
    overrides = {}
    for key, value in zip(extra[::2], extra[1::2]):
        try:
            overrides[key[2:]] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key[2:]] = {"True": True, "False": False, "None": None}.get(value, value)
    return overrides


def check_slices(path: Path, modality: str, network, count: int = 2) -> torch.Tensor:
    """``count`` real slices (the middle ones along the last axis) of ``path`` as ``network``'s input
    ``[count, 3, S, S]``, scaled by its own ``preprocess``."""
    from bundle.inferers import normalized_volume, to_slices
    from bundle.io import load_image

    volume = to_slices(normalized_volume(load_image(str(path)), modality), axis=2)  # [A, B, K] in [0, 255]
    depth = volume.shape[-1]
    indices = sorted({min(depth - 1, max(0, depth // 2 + d)) for d in range(-(count // 2), count - count // 2)})
    slices = torch.as_tensor(np.stack([volume[..., k] for k in indices]))[:, None]
    return network.preprocess(slices)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", nargs="+", default=[str(ROOT / "configs" / "inference.json")], help="bundle config file(s)"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint file or 'litemedsam' (default: the config's weights)"
    )
    parser.add_argument("--output-dir", type=Path, default=ROOT / "models")
    parser.add_argument(
        "--check-image", type=Path, default=DEFAULT_CHECK_IMAGE, help="real scan whose slices check the export"
    )
    parser.add_argument("--check-modality", default="ct", help="modality of --check-image (ct, mr, ...)")
    parser.add_argument(
        "--atol", type=float, default=1e-3, help="largest allowed |logit difference| ONNX Runtime vs PyTorch"
    )
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bundle.quiet import quiet_third_party

    quiet_third_party()

    from bundle.config import bundle_parser
    from bundle.export import export_onnx
    from bundle.networks import SAMUNet

    config = bundle_parser(args.config, ROOT, parse_overrides(extra))
    checkpoint = args.checkpoint or config.get_parsed_content("weights")
    if not checkpoint:
        raise SystemExit("no checkpoint: give --checkpoint PATH (the config names no weights)")
    config["weights"] = checkpoint
    # the configured network_def's arguments; those it leaves out come from the checkpoint's model contract
    component = config.get_parsed_content("network_def", instantiate=False).get_config()
    arguments = {k: v for k, v in component.items() if not k.startswith("_")}
    try:
        network = SAMUNet(**arguments).eval()
        if network.load_report.missing:
            raise ValueError(
                f"{checkpoint} lacks {len(network.load_report.missing)} parameters of the network to export "
                f"({network.config}), e.g. {network.load_report.missing[:6]}: export a trained checkpoint with "
                "the config it was trained with"
            )
    except (ValueError, FileNotFoundError) as error:
        print(f"export stopped, nothing written: {error}", file=sys.stderr)
        return 2
    metadata_file = ROOT / "configs" / "metadata.json"
    bundle_meta = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    metadata = {
        "bundle_name": bundle_meta.get("name", "SAM-UNet"),
        "bundle_version": bundle_meta.get("version", ""),
        "checkpoint": Path(str(checkpoint)).name,
        "exported": datetime.date.today().isoformat(),
    }
    image = check_slices(args.check_image, args.check_modality, network)
    try:
        written = export_onnx(network, args.output_dir, metadata, verify_image=image, atol=args.atol, progress=True)
    except RuntimeError as error:
        print(f"export stopped, nothing written: {error}", file=sys.stderr)
        return 3
    for path in written.values():
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    from bundle.cli import run_main  # any other failure: one line, exit code 1

    sys.exit(run_main(main))
