"""Training throughput (masks/s) and peak memory of SAM-UNet training steps (the bundle's SAMUNetTrainer).

    python scripts/benchmark_train.py [--device cpu|cuda] [--batch-size 2] [--masks-per-image 5]
        [--interactive-iterations 0 8] [--iterations 3] [--warmup 1] [--threads 2] [--json out.json]

Runs the real training step of `configs/train.json` (SAMUNetTrainer: encoder once per image, prompts sampled from
the masks, k corrective iterations, DiceFocalLoss focal + 20 x Dice, Adam on the trainable parameters) on synthetic
256x256 batches (random images, disc masks: speed does not depend on the values) for the ViT-B + ResNet34
configuration by default. For every value of --interactive-iterations it reports:
- throughput: masks per second (images x masks per image / step time), median over the timed iterations;
- peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process peak resident set (VmHWM, weights,
  Adam state and activations included), measured in a fresh child process per setting.
AMP is on for CUDA unless --no-amp.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_batch(batch: int, masks: int, size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    label = torch.zeros(batch, masks, size, size)
    for b in range(batch):
        for m in range(masks):
            cx, cy = torch.randint(40, size - 40, (2,), generator=g).tolist()
            r = int(torch.randint(8, 30, (1,), generator=g))
            label[b, m] = (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).float()
    return {"image": torch.randn(batch, 3, size, size, generator=g), "label": label}


def read_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(args, interactive: int) -> dict:
    """One setting, in this process: build, warm up, time ``args.iterations`` training iterations."""
    from monai.losses import DiceFocalLoss

    from bundle.engines import SAMUNetTrainer
    from bundle.networks import SAMUNet

    torch.manual_seed(0)
    device = torch.device(args.device)
    net = SAMUNet(args.backbone, conv_branch=args.conv_branch, image_size=args.image_size).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    batch = synthetic_batch(args.batch_size, args.masks_per_image, args.image_size)
    steps = args.warmup + args.iterations
    times: list[float] = []

    class Loader:
        def __iter__(self):
            for _ in range(steps):
                yield batch

        def __len__(self):
            return steps

    trainer = SAMUNetTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=Loader(),
        network=net,
        optimizer=torch.optim.Adam(params, 1e-4),
        loss_function=DiceFocalLoss(sigmoid=True, gamma=2.0, alpha=0.25, lambda_dice=20.0),
        prompt_probs={"box": 0.5, "points": 0.5},
        interactive_iterations=interactive,
        prompt_seed=0,
        amp=args.amp and device.type == "cuda",
    )
    state = {}

    def started(engine):
        if device.type == "cuda":
            torch.cuda.synchronize()
        state["t"] = time.perf_counter()

    def completed(engine):
        if device.type == "cuda":
            torch.cuda.synchronize()
        if engine.state.iteration > args.warmup:
            times.append(time.perf_counter() - state["t"])
        if engine.state.iteration == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, completed)
    trainer.run()
    step = statistics.median(times)
    masks = args.batch_size * args.masks_per_image
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else read_status("VmHWM")
    return {
        "interactive_iterations": interactive,
        "step_s_median": step,
        "step_s_all": times,
        "masks_per_s": masks / step,
        "images_per_s": args.batch_size / step,
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM)",
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in net.parameters()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--conv-branch", default="resnet34")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2, help="images per step")
    parser.add_argument("--masks-per-image", type=int, default=5)
    parser.add_argument("--interactive-iterations", type=int, nargs="+", default=[0, 8])
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument(
        "--tune-malloc", action="store_true", help="bundle.networks.cpu.tune_malloc() in the measuring process"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        if args.tune_malloc:
            from bundle.networks.cpu import tune_malloc

            tune_malloc()
        print(json.dumps(measure(args, args.child)))
        return 0

    results = []
    for k in args.interactive_iterations:
        if args.device == "cpu":
            # a fresh process per setting so the peak RSS belongs to that setting alone
            cmd = [
                sys.executable,
                __file__,
                *[a for a in (argv if argv is not None else sys.argv[1:])],
                "--child",
                str(k),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
        else:
            result = measure(args, k)
        results.append(result)
        print(
            f"{args.backbone}+{args.conv_branch} {args.device} batch {args.batch_size}x{args.masks_per_image} masks, "
            f"k={k}: {result['masks_per_s']:.2f} masks/s ({result['step_s_median']:.2f} s/step), "
            f"peak {result['peak_memory_bytes'] / 2**30:.2f} GiB ({result['peak_memory_kind']})",
            flush=True,
        )
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "child")},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
