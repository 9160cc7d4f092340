#!/usr/bin/env python
"""Benchmark prompted volume inference and encoder throughput.

Volume mode (default): the bundle's volume inference (the ``VolumeInferenceRunner`` of ``configs/inference.json``:
load, modality normalisation, slice-wise encoding in batches, decoding, writing the NIfTI mask) on a real case with a
3D box, then one extra click on an already-encoded slice (decoder only, the embedding comes from the cache).
``--runtimes`` runs it on several runtimes of the same network in one process and reports each one's time, its ratio
to the first and its mask's agreement with the first:

- ``eager``: the PyTorch network;
- ``compiled``: the image encoder through ``torch.compile`` (``bundle.export.torch_compile_encoder``);
- ``onnx``: ``encoder.onnx`` + ``decoder.onnx`` written by ``bundle.export.export_onnx`` and run in ONNX Runtime
  (``bundle.export.OnnxSAMUNet``, what ``configs/inference_onnx.json`` runs).

Each runtime runs the volume once to warm up (compilation, ONNX export and session start are reported apart), then
``--repeats`` timed runs with an empty embedding cache; the median is reported.

    python scripts/benchmark_volume.py                                        # lung1, CPU, 2 threads, eager
    python scripts/benchmark_volume.py --runtimes eager compiled onnx         # the CPU comparison
    python scripts/benchmark_volume.py --device cuda                          # on a GPU (bf16/fp16 autocast)

Throughput mode (``--throughput``): encoder slices/s of the network for each ``--batch-sizes`` x ``--dtypes``
(``fp32``, ``bf16`` autocast) with peak memory (``torch.cuda.max_memory_allocated`` on CUDA, process peak RSS on CPU),
random weights (speed does not depend on them), channels-last input::

    python scripts/benchmark_volume.py --throughput --device cuda --backbone vit_b --batch-sizes 1 8 32 64

Prints JSON and markdown table rows for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# lung1 tumour (ITK index i 206-229, j 347-372, k 32-34) with a 5-voxel in-plane margin
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "lung1_image.nrrd"
DEFAULT_BOX = [201, 342, 32, 234, 377, 34]
NETWORKS = {  # --backbone -> SAMUNet arguments (the pixel normalisation follows from them and the weights)
    "tiny_vit": dict(backbone="tiny_vit", conv_branch="none", fusion=False, decoder_tokens="sam"),
    "tiny_vit_unet": dict(backbone="tiny_vit", conv_branch="resnet34", fusion=True, decoder_tokens="sam"),
    "vit_b": dict(backbone="vit_b", conv_branch="resnet34", fusion=True, decoder_tokens="med"),
}


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def build_runtime(name: str, network, workdir: Path):
    """The network as runtime ``name`` runs it, and the seconds that took (export, session start)."""
    from bundle import export

    t0 = time.perf_counter()
    if name == "eager":
        runtime = network
    elif name == "compiled":
        runtime = export.torch_compile_encoder(network)
    elif name == "onnx":
        files = export.export_onnx(network, workdir / "onnx")
        runtime = export.OnnxSAMUNet(files["encoder.onnx"], files["decoder.onnx"])
    else:
        raise SystemExit(f"unknown runtime {name!r}: expected eager, compiled or onnx")
    return runtime, time.perf_counter() - t0


def run_volume(runtime, args, device, out: Path):
    """One volume inference with a fresh cache: (seconds, result, inferer stats)."""
    from bundle.inferers import EmbeddingCache, PromptedSliceInferer, VolumeInferenceRunner

    inferer = PromptedSliceInferer(runtime, batch_size=args.batch_size, cache=EmbeddingCache(), device=device)
    runner = VolumeInferenceRunner(
        inferer,
        [{"image": args.image, "box": json.loads(args.box)}],
        str(out),
        modality=args.modality,
        weights=args.weights or "random",
    )
    synchronize(device)
    t0 = time.perf_counter()
    result = runner.run()[0]
    synchronize(device)
    return time.perf_counter() - t0, result, inferer


def time_clicks(inferer, args, device) -> list[float]:
    """Latency of ``args.clicks`` extra clicks on the middle slice of the box (decoder only, cached embedding)."""

    from bundle.inferers import SlicePrompt, normalized_volume, to_slices
    from bundle.io import load_image

    box = json.loads(args.box)
    volume = to_slices(normalized_volume(load_image(args.image), args.modality), axis=2)
    k = (box[2] + box[5]) // 2
    image_id = (os.path.abspath(args.image), args.modality)  # the runner's cache key
    click = SlicePrompt(
        box=(box[0], box[1], box[3], box[4]), points=[((box[0] + box[3]) // 2, (box[1] + box[4]) // 2)], labels=[1]
    )
    encoded_before = inferer.stats["encoded"]
    latencies = []
    for _ in range(args.clicks):
        synchronize(device)
        t0 = time.perf_counter()
        inferer.segment_slice(volume, k, click, image_id=image_id, axis=2)
        synchronize(device)
        latencies.append(time.perf_counter() - t0)
    assert inferer.stats["encoded"] == encoded_before, "the click re-encoded the slice"
    return latencies


def volume_mode(args, device) -> dict:
    import nibabel as nib
    import numpy as np
    import torch

    from bundle.io import load_image
    from bundle.networks import SAMUNet

    kwargs = NETWORKS[args.backbone]
    t0 = time.perf_counter()
    network = SAMUNet(**kwargs, weights=args.weights or None).eval()
    build_s = time.perf_counter() - t0
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        for name in args.runtimes:
            runtime, setup_s = build_runtime(name, network, workdir)
            first_s, _, _ = run_volume(runtime, args, device, workdir / f"{name}_warmup")
            times = []
            for repeat in range(args.repeats):
                seconds, result, inferer = run_volume(runtime, args, device, workdir / f"{name}_{repeat}")
                times.append(seconds)
            clicks = time_clicks(inferer, args, device)
            mask = np.asarray(nib.load(result["mask"]).dataobj) > 0
            reference = mask if reference is None else reference
            stats = dict(inferer.stats)
            rows.append(
                {
                    "runtime": name,
                    "setup_s": round(setup_s, 2),
                    "first_volume_s": round(first_s, 2),
                    "seconds_per_volume": round(statistics.median(times), 2),
                    "slices": len(result["prompted_slices"]),
                    "encode_s_per_slice": round(stats["encode_s"] / max(stats["encoded"], 1), 3),
                    "extra_click_ms_median": round(1000 * statistics.median(clicks), 1),
                    "mask_voxels": int(mask.sum()),
                    "mask_agreement_with_first": float((mask == reference).mean()),
                }
            )
            del runtime
    base = rows[0]["seconds_per_volume"]
    for row in rows:
        row["speedup_vs_first"] = round(base / row["seconds_per_volume"], 2)
    summary = {
        "image": os.path.basename(args.image),
        "shape": list(load_image(args.image).shape[1:]),
        "box": json.loads(args.box),
        "device": str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({args.threads} threads)"),
        "cpu": platform.processor() or platform.machine(),
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "network_build_s": round(build_s, 2),
        "load_average": os.getloadavg()[0],
        "torch": torch.__version__,
        "runtimes": rows,
    }
    print(json.dumps(summary, indent=2))
    for row in rows:
        print(
            f"| {summary['image']} | {summary['device']} | {args.backbone} | {row['runtime']} | {row['slices']} | "
            f"{row['seconds_per_volume']} | {row['speedup_vs_first']} | {row['encode_s_per_slice']} | "
            f"{row['extra_click_ms_median']} | {row['mask_agreement_with_first']:.5f} |"
        )
    return summary


def throughput_mode(args, device) -> dict:
    import torch

    from bundle.networks import SAMUNet

    kwargs = NETWORKS[args.backbone]
    network = SAMUNet(**kwargs, image_size=args.image_size, weights=args.weights or None).eval().to(device)
    network = network.to(memory_format=torch.channels_last)
    rows = []
    for dtype in args.dtypes:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
        for batch in args.batch_sizes:
            image = torch.rand(batch, 3, args.image_size, args.image_size, device=device).to(
                memory_format=torch.channels_last
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                with torch.no_grad(), autocast:
                    for _ in range(args.warmup):
                        network.encode(image)
                    synchronize(device)
                    t0 = time.perf_counter()
                    for _ in range(args.iterations):
                        network.encode(image)
                    synchronize(device)
                seconds = (time.perf_counter() - t0) / args.iterations
            except torch.OutOfMemoryError:
                rows.append({"dtype": dtype, "batch": batch, "error": "out of memory"})
                continue
            peak = (
                torch.cuda.max_memory_allocated(device)
                if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
            rows.append(
                {
                    "dtype": dtype,
                    "batch": batch,
                    "seconds_per_batch": seconds,
                    "slices_per_s": batch / seconds,
                    "peak_memory_gib": peak / 2**30,
                }
            )
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({args.threads} threads)",
        "backbone": args.backbone,
        "image_size": args.image_size,
        "torch": torch.__version__,
        "rows": rows,
    }
    print(json.dumps(summary, indent=2))
    for row in rows:
        if "error" in row:
            print(f"| {summary['device']} | {args.backbone} | {row['dtype']} | {row['batch']} | {row['error']} | | |")
        else:
            print(
                f"| {summary['device']} | {args.backbone} | {row['dtype']} | {row['batch']} | {row['slices_per_s']:.1f} | "
                f"{1000 * row['seconds_per_batch']:.1f} | {row['peak_memory_gib']:.2f} |"
            )
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--box", default=json.dumps(DEFAULT_BOX), help="3D box [i0,j0,k0,i1,j1,k1] (JSON)")
    parser.add_argument("--modality", default="ct")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=8, help="volume mode: slices per encoder call")
    parser.add_argument("--weights", default="litemedsam", help="checkpoint, 'litemedsam', or '' for random weights")
    parser.add_argument(
        "--backbone",
        default="tiny_vit",
        choices=sorted(NETWORKS),
        help="tiny_vit (LiteMedSAM default), tiny_vit_unet (SAM-UNet-Lite), vit_b (SAM-UNet)",
    )
    parser.add_argument("--runtimes", nargs="+", default=["eager"], choices=["eager", "compiled", "onnx"])
    parser.add_argument("--repeats", type=int, default=1, help="timed volume runs per runtime (median)")
    parser.add_argument("--clicks", type=int, default=5, help="extra clicks to time")
    parser.add_argument(
        "--no-tune-malloc", action="store_true", help="keep glibc's malloc defaults (inference.json tunes them on CPU)"
    )
    parser.add_argument("--throughput", action="store_true", help="encoder throughput instead of volume inference")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if device.type == "cpu" and not args.no_tune_malloc:
        from bundle.networks.cpu import tune_malloc

        tune_malloc()
    summary = throughput_mode(args, device) if args.throughput else volume_mode(args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
