"""Seconds per step and peak memory of prompt-free task training (``configs/train.json`` + ``configs/train_auto.json``).

    python scripts/benchmark_task_train.py [--settings cached cached-fusion images images-conv] [--batch-size 8]
        [--batch-size-conv 1] [--iterations 3] [--warmup 1] [--threads 2] [--json FILE]

Each setting builds the trainer of the two configs as a user runs them (MONAI ``SupervisedTrainer``, no prompt,
DiceFocalLoss, Adam on the trainable parameters) with LiteMedSAM's weights, and trains on synthetic 256 x 256 windows
(random images, disc masks: the speed does not depend on the values):

- ``cached``: the default. LiteMedSAM's frozen encoder, its prompt encoder and mask decoder trained on cached encoder
  outputs (``cache_features``, ``EncodedViews``): a step runs the decoder only; the encoder runs once per window when
  the set is built (reported as ``encode_s_per_window``).
- ``cached-fusion``: the same plus SAM-UNet's fusion path (bridge adapters trained on the cached TinyViT stage grids).
- ``images``: LiteMedSAM's decoder trained without the cache: the frozen encoder runs (no gradient) in every step.
- ``images-conv``: SAM-UNet-Lite (a ResNet34 branch injected into the frozen TinyViT, fusion): the whole network on
  images, the backward pass through the encoder; nothing can be cached.

Peak memory is the process's peak resident set (VmHWM) in a fresh child process per setting on CPU, or
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "cached": {"cache_features": True, "network_def#conv_branch": "none", "network_def#fusion": False},
    "cached-fusion": {"cache_features": True, "network_def#conv_branch": "none", "network_def#fusion": True},
    "images": {"cache_features": False, "network_def#conv_branch": "none", "network_def#fusion": False},
    "images-conv": {"cache_features": False, "network_def#conv_branch": "resnet34", "network_def#fusion": True},
}


def synthetic_windows(count: int, size: int = 256, seed: int = 0) -> list[dict]:
    """Windows as train_auto.json's pipeline hands them on: image ``[3, S, S]`` (LiteMedSAM-scaled), mask ``[1, S, S]``."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    windows = []
    for _ in range(count):
        cy, cx = torch.randint(60, size - 60, (2,), generator=g).tolist()
        disc = (((rows - cy) ** 2 + (cols - cx) ** 2) < 40**2).float()[None]
        windows.append({"image": torch.rand(3, size, size, generator=g), "label": disc})
    return windows


def read_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(args, setting: str) -> dict:
    from ignite.engine import Events
    from monai.data import Dataset
    from monai.transforms import Compose

    from bundle.config import bundle_parser
    from bundle.data import EncodedViews

    device = torch.device(args.device)
    steps = args.warmup + args.iterations
    batch_size = args.batch_size_conv if setting == "images-conv" else args.batch_size
    overrides = {
        **SETTINGS[setting],
        "bundle_root": args.workdir,
        "device": f"$torch.device('{device}')",
        "batch_size": batch_size,
        "max_epochs": 1,
        "epoch_length": steps,
        "progress_bar": False,
        "val_interval": 10**6,
        "validate#datalist": [],
        "amp": args.amp and device.type == "cuda",
    }
    parser = bundle_parser(["configs/train.json", "configs/train_auto.json"], ROOT, overrides)
    windows = synthetic_windows(batch_size * steps)
    encode_s = None
    if SETTINGS[setting]["cache_features"]:
        start = time.perf_counter()
        dataset = EncodedViews(windows, Compose([]), parser.get_parsed_content("train#model"), views=1)
        encode_s = (time.perf_counter() - start) / len(windows)
    else:
        dataset = Dataset(windows)
    parser["train#dataset"] = dataset
    trainer = parser.get_parsed_content("train#trainer")
    times: list[float] = []
    clock = {}

    def started(engine):
        if device.type == "cuda":
            torch.cuda.synchronize()
        clock["t"] = time.perf_counter()

    def completed(engine):
        if device.type == "cuda":
            torch.cuda.synchronize()
        if engine.state.iteration > args.warmup:
            times.append(time.perf_counter() - clock["t"])

    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, completed)
    trainer.run()
    network = parser.get_parsed_content("network")
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else read_status("VmHWM")
    return {
        "setting": setting,
        "batch_size": batch_size,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "windows_per_s": batch_size / statistics.median(times),
        "encode_s_per_window": encode_s,
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM)",
        "trainable_params": sum(p.numel() for p in network.parameters() if p.requires_grad),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step")
    parser.add_argument(
        "--batch-size-conv",
        type=int,
        default=1,
        help="windows per step of images-conv (the backward pass through the encoder takes several GiB per window)",
    )
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--workdir", default="/tmp/benchmark_task_train", help="bundle_root for the run's outputs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bundle.networks.cpu import tune_malloc

    if args.device == "cpu":
        tune_malloc()
    if args.child is not None:
        print(json.dumps(measure(args, args.child)))
        return 0
    results = []
    for setting in args.settings:
        if args.device == "cpu":  # a fresh process per setting, so the peak RSS is that setting's alone
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", setting]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
        else:
            result = measure(args, setting)
        results.append(result)
        encode = (
            f", encoder {result['encode_s_per_window']:.2f} s per window once" if result["encode_s_per_window"] else ""
        )
        print(
            f"{setting}: batch {result['batch_size']}, {result['step_s_median']:.2f} s/step "
            f"({result['windows_per_s']:.2f} windows/s){encode}, peak {result['peak_memory_bytes'] / 2**30:.2f} GiB "
            f"({result['peak_memory_kind']}), {result['trainable_params']:,} trainable parameters",
            flush=True,
        )
    if args.json:
        from bundle.io import write_run_record

        argv = argv if argv is not None else sys.argv[1:]
        write_run_record(args.json, "scripts/benchmark_task_train.py", argv, args.device, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
