"""CPU latency and peak memory of the SAM-UNet network per 256x256 image.

    python scripts/benchmark_network.py [--threads 2] [--repeats 10] [--conv-branch resnet34] [--json out.json]

Measures, in one run and interleaved so machine load affects both alike:
- encode latency of SAM-UNet (ViT-B + conv branch + adapters + fusion) and of segment_anything's own ViT-B
  ``ImageEncoderViT`` at 256, and their ratio;
- decode latency per prompt on a cached embedding (1 prompt and a batch of 8 prompts);
- peak resident memory of one encode and of one decode, each in a fresh child process (Linux: the peak is reset with
  /proc/self/clear_refs after the model is built and read from VmHWM): the process total (weights included) and what
  the step added on top of the built model.
Weights are random: speed and memory do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.networks import SAMUNet  # noqa: E402


def build(kind: str, conv_branch: str):
    """The model under test: ``samunet`` (encode + decode) or ``sam`` (segment_anything's ViT-B encoder at 256)."""
    if kind == "sam":
        from segment_anything.modeling import ImageEncoderViT

        return ImageEncoderViT(
            img_size=256,
            embed_dim=768,
            depth=12,
            num_heads=12,
            mlp_ratio=4,
            out_chans=256,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=14,
            global_attn_indexes=(2, 5, 8, 11),
        ).eval()
    return SAMUNet("vit_b", conv_branch=conv_branch).eval()


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def read_status(field: str) -> int:
    """A VmXXX field of /proc/self/status in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(kind: str, step: str, conv_branch: str, threads: int) -> tuple[int, int]:
    """Run one step in this process (called as a child): return (process peak RSS, peak RSS added by the step)."""
    torch.set_num_threads(threads)
    net = build(kind, conv_branch)
    image = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        features = net.encode(image) if kind == "samunet" else None
        box = torch.tensor([[30.0, 40.0, 200.0, 210.0]])
        run = {
            "encode": lambda: net.encode(image) if kind == "samunet" else net(image),
            "decode": lambda: net.decode(features, boxes=box),
        }[step]
        Path("/proc/self/clear_refs").write_text("5")
        before = read_status("VmRSS")
        run()
        peak = read_status("VmHWM")
        return peak, peak - before


def measure_peak(kind: str, step: str, conv_branch: str, threads: int) -> tuple[float, float]:
    """Peak memory of one step in a fresh process, in MiB: (process total, added by the step)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, step, "--conv-branch", conv_branch, "--threads", str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    total, added = out.stdout.strip().splitlines()[-1].split()
    return int(total) / 2**20, int(added) / 2**20


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--conv-branch", default="resnet34")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "STEP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(*peak_memory_child(*args.child, args.conv_branch, args.threads))
        return {}

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"building models (threads={args.threads}) ...", file=sys.stderr)
    net, sam = build("samunet", args.conv_branch), build("sam", args.conv_branch)
    image = torch.randn(1, 3, 256, 256)
    box1 = torch.tensor([[30.0, 40.0, 200.0, 210.0]])
    box8 = box1.repeat(8, 1)
    with torch.inference_mode():
        for _ in range(2):
            net.encode(image), sam(image)
        encode_ours, encode_sam = [], []
        for i in range(args.repeats):  # interleaved
            encode_ours += timed(lambda: net.encode(image), 1)
            encode_sam += timed(lambda: sam(image), 1)
            print(
                f"  encode {i + 1}/{args.repeats}: ours {encode_ours[-1]:.3f} s, sam {encode_sam[-1]:.3f} s",
                file=sys.stderr,
            )
        features = net.encode(image)
        index8 = torch.zeros(8, dtype=torch.long)
        for _ in range(3):
            net.decode(features, boxes=box1)
        decode1 = timed(lambda: net.decode(features, boxes=box1), args.repeats * 5)
        decode8 = timed(lambda: net.decode(features, boxes=box8, image_index=index8), args.repeats * 2)

    print("measuring peak memory in child processes ...", file=sys.stderr)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "conv_branch": args.conv_branch,
        "encode_samunet_s": statistics.median(encode_ours),
        "encode_sam_vit_b_s": statistics.median(encode_sam),
        "decode_1_prompt_ms": 1000 * statistics.median(decode1),
        "decode_per_prompt_batch8_ms": 1000 * statistics.median(decode8) / 8,
        "peak_encode_samunet_mib": measure_peak("samunet", "encode", args.conv_branch, args.threads),
        "peak_encode_sam_vit_b_mib": measure_peak("sam", "encode", args.conv_branch, args.threads),
        "peak_decode_samunet_mib": measure_peak("samunet", "decode", args.conv_branch, args.threads),
    }
    result["encode_ratio"] = result["encode_samunet_s"] / result["encode_sam_vit_b_s"]
    mib = "{0[0]:.0f} MiB total, +{0[1]:.0f} MiB".format
    print(
        "| step | median latency | peak RSS (process, added by the step) |\n| --- | --- | --- |\n"
        f"| encode SAM-UNet ViT-B + {args.conv_branch} | {result['encode_samunet_s']:.3f} s | {mib(result['peak_encode_samunet_mib'])} |\n"
        f"| encode segment_anything ViT-B @256 | {result['encode_sam_vit_b_s']:.3f} s | {mib(result['peak_encode_sam_vit_b_mib'])} |\n"
        f"| encode ratio (target <= 1.35) | {result['encode_ratio']:.2f} | |\n"
        f"| decode, 1 prompt, cached embedding (target <= 20 ms) | {result['decode_1_prompt_ms']:.1f} ms | {mib(result['peak_decode_samunet_mib'])} |\n"
        f"| decode per prompt, batch of 8 | {result['decode_per_prompt_batch8_ms']:.1f} ms | |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
