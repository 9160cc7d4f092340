"""Training throughput (masks/s) and peak memory of SAM-UNet training steps (the bundle's SAMUNetTrainer).

    python scripts/benchmark_train.py [--device cpu|cuda] [--backbone tiny_vit] [--decoder-tokens sam]
        [--batch-size 2] [--masks-per-image 5] [--interactive-iterations 0 8] [--iterations 3] [--warmup 1]
        [--accumulate-steps 1] [--no-checkpoint-activations] [--no-stepwise-backward] [--decoder-batch 1]
        [--no-set-to-none]
        [--channels-last] [--no-amp] [--amp-dtype bf16|fp16] [--threads 2] [--tune-malloc]
        [--profile-memory table.md] [--json out.json]

Runs the real training step of `configs/train.json` (SAMUNetTrainer: encoder once per image, prompts sampled from
the masks, k corrective iterations, DiceFocalLoss focal + 20 x Dice, Adam on the trainable parameters) on synthetic
256x256 batches (random images, disc masks: speed does not depend on the values) for the ViT-B + ResNet34
configuration by default. The memory switches are the trainer's (train.json defaults: activation checkpointing,
step-wise decoder backward, gradients set to None; channels-last off). For every value of --interactive-iterations
it reports:
- throughput: masks per second (images x masks per image / step time), median over the timed iterations;
- peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process peak resident set (VmHWM, weights,
  Adam state and activations included), measured in a fresh child process per setting, and the peak above the
  idle model (RSS, on CUDA ``memory_allocated``, once network, optimiser and trainer are built; Adam's state is
  made in the first step and counts as the step's), also per image of a micro-batch.
AMP (bf16 autocast where the GPU supports it, else fp16 with a GradScaler) is on for CUDA unless --no-amp.

--profile-memory: one more step under ``torch.profiler`` (``profile_memory``), each module's forward in a
``record_function`` range; writes a markdown table of the memory each module's forward calls leave allocated
(outputs and what autograd saves for the backward pass), summed over its calls.
"""

from __future__ import annotations

import argparse
import json
import math
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


def module_groups(net) -> dict:
    """The network's parts to attribute memory to: ``{name: [modules]}`` for the top-level modules and the encoder's
    and decoder's children. A TinyViT stage is its blocks and downsampling (the encoder calls those one by one, not
    the stage's own forward), so a stage's entry lists them."""
    groups = {}
    for name, child in net.named_children():
        if name not in ("image_encoder", "mask_decoder"):
            groups[name] = [child]
            continue
        for sub_name, sub in child.named_children():
            if not isinstance(sub, torch.nn.ModuleList):
                groups[f"{name}.{sub_name}"] = [sub]
                continue
            for i, module in enumerate(sub):
                parts = list(getattr(module, "blocks", [])) + [getattr(module, "downsample", None)]
                groups[f"{name}.{sub_name}.{i}"] = [m for m in parts if m is not None] or [module]
    return groups


def profile_by_module(trainer, net, batch: dict, path: str) -> None:
    """One more training iteration under torch.profiler, each module's forward in a record_function range."""
    from torch.profiler import ProfilerActivity, profile, record_function

    open_ranges, handles = [], []
    for name, modules in module_groups(net).items():

        def enter(mod, inputs, name=name):
            open_ranges.append(record_function(f"module::{name}"))
            open_ranges[-1].__enter__()

        def leave(mod, inputs, output):
            open_ranges.pop().__exit__(None, None, None)

        for module in modules:
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    cuda = trainer.state.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=True) as prof:
        trainer._iteration(trainer, batch)
    for handle in handles:
        handle.remove()

    def used(event) -> int:
        return event.device_memory_usage if cuda else event.cpu_memory_usage

    rows = sorted((e for e in prof.key_averages() if e.key.startswith("module::")), key=lambda e: -used(e))
    where = "CUDA" if cuda else "CPU"
    lines = [
        f"| module | forward calls | {where} memory left allocated by its forward calls (MiB) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| `{e.key[len('module::') :]}` | {e.count} | {used(e) / 2**20:.1f} |" for e in rows]
    Path(path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def measure(args, interactive: int) -> dict:
    """One setting, in this process: build, warm up, time ``args.iterations`` training iterations."""
    from ignite.engine import Events
    from monai.losses import DiceFocalLoss

    from bundle.engines import SAMUNetTrainer
    from bundle.networks import SAMUNet

    torch.manual_seed(0)
    device = torch.device(args.device)
    net = SAMUNet(
        args.backbone, conv_branch=args.conv_branch, image_size=args.image_size, decoder_tokens=args.decoder_tokens
    ).to(device)
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

    amp = args.amp and device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype]
    if amp and amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        amp_dtype = torch.float16
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
        amp=amp,
        amp_kwargs={"dtype": amp_dtype},
        accumulate_steps=args.accumulate_steps,
        checkpoint_activations=args.checkpoint_activations,
        stepwise_backward=args.stepwise_backward,
        decoder_batch=args.decoder_batch or None,
        channels_last=args.channels_last,
        optim_set_to_none=args.set_to_none,
    )
    # the idle model: weights built, before the first step (Adam's state, made in the first step, counts as the step's)
    idle = torch.cuda.memory_allocated(device) if device.type == "cuda" else read_status("VmRSS")
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

    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, completed)
    trainer.run()
    step = statistics.median(times)
    masks = args.batch_size * args.masks_per_image
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak, kind = read_status("VmHWM"), "process peak RSS (VmHWM)"
    above_idle = peak - idle
    micro_batch = math.ceil(args.batch_size / args.accumulate_steps)  # the images one forward/backward holds
    final_loss = float(trainer.state.output[0]["loss"])
    if args.profile_memory:
        profile_by_module(trainer, net, batch, args.profile_memory)
    return {
        "interactive_iterations": interactive,
        "step_s_median": step,
        "step_s_all": times,
        "masks_per_s": masks / step,
        "images_per_s": args.batch_size / step,
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "idle_bytes": idle,
        "peak_above_idle_bytes": above_idle,
        "micro_batch_images": micro_batch,
        "peak_above_idle_per_image_bytes": above_idle / micro_batch,
        "final_loss": final_loss,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in net.parameters()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--conv-branch", default="resnet34")
    parser.add_argument("--decoder-tokens", default="med", choices=["med", "sam"], help="train.json's Lite uses sam")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2, help="images per step")
    parser.add_argument("--masks-per-image", type=int, default=5)
    parser.add_argument("--interactive-iterations", type=int, nargs="+", default=[0, 8])
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--accumulate-steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--no-checkpoint-activations", dest="checkpoint_activations", action="store_false")
    parser.add_argument("--no-stepwise-backward", dest="stepwise_backward", action="store_false")
    parser.add_argument("--decoder-batch", type=int, default=1, help="masks per decoder pass (0: all)")
    parser.add_argument("--no-set-to-none", dest="set_to_none", action="store_false")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"], help="fp16 where bf16 is unsupported")
    parser.add_argument(
        "--tune-malloc", action="store_true", help="bundle.networks.cpu.tune_malloc() in the measuring process"
    )
    parser.add_argument("--profile-memory", default=None, help="write the memory-by-module table here (markdown)")
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
            completed = subprocess.run(cmd, capture_output=True, text=True)
            if completed.returncode:
                sys.stderr.write(completed.stderr)
                raise SystemExit(f"the measuring process for k={k} failed (exit {completed.returncode})")
            lines = completed.stdout.strip().splitlines()
            result = json.loads(lines[-1])
            print("\n".join(lines[:-1]), flush=True)  # the --profile-memory table
        else:
            result = measure(args, k)
        results.append(result)
        above = result["peak_above_idle_per_image_bytes"]
        print(
            f"{args.backbone}+{args.conv_branch} {args.device} batch {args.batch_size}x{args.masks_per_image} masks "
            f"(accumulate {args.accumulate_steps}), k={k}: {result['masks_per_s']:.2f} masks/s "
            f"({result['step_s_median']:.2f} s/step), peak {result['peak_memory_bytes'] / 2**30:.2f} GiB "
            f"({result['peak_memory_kind']})"
            + f", {above / 2**30:.2f} GiB per image of a micro-batch above the idle model",
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
