"""Convert an external checkpoint into the bundle's own ``{"model": state_dict, "network": contract}`` format.

    python scripts/convert_checkpoint.py SOURCE OUT.pt [--format auto|sam|sam_unet_reference|torchvision_resnet]
        [--backbone vit_b] [--conv-branch resnet34] [--no-fusion] [--trust-pickle]

The source is mapped onto a SAMUNet of the given configuration, with missing and dropped keys listed by name, and
saved with only tensors and its model contract (the configuration, the pixel normalisation and a weights
fingerprint), so later loads work with ``weights_only=True`` and build the right network with no overrides. Reference SAM-UNet checkpoints also pickle
their optimizer; reading those executes pickled code, so it needs ``--trust-pickle`` and a file you trust.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.io import atomic_write  # noqa: E402
from bundle.networks import SAMUNet  # noqa: E402
from bundle.networks.contract import CONTRACT_KEY  # noqa: E402
from bundle.networks.weights import (  # noqa: E402
    FORMATS,
    convert_state_dict,
    read_state_dict,
    require_finite_weights,
)
from bundle.quiet import quiet_third_party  # noqa: E402


def read_trusted(path: Path) -> dict:
    """Read a checkpoint with full unpickling (only for files the user trusts) and return its model state dict."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a corrupt file can fail anywhere inside the unpickler
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__})") from None
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    require_finite_weights(state, str(path))
    return state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--conv-branch", default="resnet34")
    parser.add_argument("--no-fusion", action="store_true")
    parser.add_argument("--decoder-tokens", default="med", choices=("med", "sam"))
    parser.add_argument("--trust-pickle", action="store_true", help="unpickle arbitrary objects (trusted files only)")
    args = parser.parse_args(argv)
    quiet_third_party()

    if args.output.resolve() == args.source.resolve():
        parser.error("the output would overwrite the source checkpoint")
    try:
        state = read_trusted(args.source) if args.trust_pickle else read_state_dict(args.source)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    net = SAMUNet(
        args.backbone, conv_branch=args.conv_branch, fusion=not args.no_fusion, decoder_tokens=args.decoder_tokens
    )
    try:
        mapped, report = convert_state_dict(net, state, args.format)
    except ValueError as error:
        print(f"error: {args.source}: {error}", file=sys.stderr)
        return 2
    net.load_state_dict(mapped, strict=False)
    print(report.summary())
    with atomic_write(args.output) as tmp:
        torch.save({"model": net.state_dict(), CONTRACT_KEY: net.contract()}, tmp)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    from bundle.cli import run_main  # any other failure: one line, exit code 1

    sys.exit(run_main(main))
