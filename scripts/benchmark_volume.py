#!/usr/bin/env python
"""Benchmark prompted volume inference: seconds per volume, slices/s, and the latency of one extra click.

Runs the bundle's volume inference (the same ``VolumeInferenceRunner`` as ``configs/inference.json``: load, modality
normalisation, slice-wise encoding in batches, decoding, writing the NIfTI mask) on a real case with a 3D box, then
times one extra click on an already-encoded slice (decoder only, the embedding comes from the cache).

    python scripts/benchmark_volume.py                      # lung1 from ../shared/data, CPU with 2 threads
    python scripts/benchmark_volume.py --device cuda        # on a GPU (bf16/fp16 autocast)

Prints a JSON summary and a markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--box", default=json.dumps(DEFAULT_BOX), help="3D box [i0,j0,k0,i1,j1,k1] (JSON)")
    parser.add_argument("--modality", default="ct")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--weights", default="litemedsam")
    parser.add_argument("--backbone", default="tiny_vit", help="tiny_vit (LiteMedSAM default) or vit_b (SAM-UNet)")
    parser.add_argument("--clicks", type=int, default=5, help="extra clicks to time")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    from bundle.inferers import EmbeddingCache, PromptedSliceInferer, SlicePrompt, VolumeInferenceRunner
    from bundle.networks import SAMUNet

    t0 = time.perf_counter()
    if args.backbone == "tiny_vit":
        net = SAMUNet("tiny_vit", conv_branch="none", fusion=False, decoder_tokens="sam", weights=args.weights)
        normalization = "litemedsam"
    else:
        net = SAMUNet(args.backbone, weights=args.weights)
        normalization = "sam"
    build_s = time.perf_counter() - t0
    box = json.loads(args.box)
    inferer = PromptedSliceInferer(net, normalization, batch_size=args.batch_size, cache=EmbeddingCache(), device=device)
    with tempfile.TemporaryDirectory() as out:
        runner = VolumeInferenceRunner(inferer, [{"image": args.image, "box": box}], out, modality=args.modality, weights=args.weights)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = runner.run()[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        volume_s = time.perf_counter() - t0
    slices = len(result["prompted_slices"])
    stats = dict(inferer.stats)

    # one extra click on an already-encoded slice: the embedding is in the cache, only the decoder runs
    from bundle.inferers import load_image
    from bundle.transforms.intensity import ModalityNormalize
    import numpy as np

    volume = np.asarray(ModalityNormalize(modality=args.modality, out_channels=1)(load_image(args.image)))[0]
    k = (box[2] + box[5]) // 2
    image_id = (os.path.abspath(args.image), args.modality)  # the runner's cache key
    click = SlicePrompt(box=(box[0], box[1], box[3], box[4]), points=[((box[0] + box[3]) // 2, (box[1] + box[4]) // 2)], labels=[1])
    encoded_before = inferer.stats["encoded"]
    latencies = []
    for _ in range(args.clicks):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        inferer.segment_slice(volume, k, click, image_id=image_id, axis=2)
        if device.type == "cuda":
            torch.cuda.synchronize()
        latencies.append(time.perf_counter() - t0)
    assert inferer.stats["encoded"] == encoded_before, "the click re-encoded the slice"

    summary = {
        "image": os.path.basename(args.image),
        "shape": list(load_image(args.image).shape[1:]),
        "box": box,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({args.threads} threads)"),
        "cpu": platform.processor() or platform.machine(),
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "network_build_s": round(build_s, 2),
        "seconds_per_volume": round(volume_s, 2),
        "slices": slices,
        "slices_per_s": round(slices / volume_s, 3),
        "encode_s": round(stats["encode_s"], 2),
        "decode_s": round(stats["decode_s"], 2),
        "encode_slices_per_s": round(stats["encoded"] / max(stats["encode_s"], 1e-9), 3),
        "extra_click_ms_median": round(1000 * statistics.median(latencies), 1),
        "mask_voxels": result["voxels"],
        "torch": torch.__version__,
    }
    print(json.dumps(summary, indent=2))
    print(
        f"| {summary['image']} {'x'.join(map(str, summary['shape']))} | {summary['device']} | {args.backbone} | "
        f"{slices} | {summary['seconds_per_volume']} | {summary['slices_per_s']} | {summary['encode_slices_per_s']} | "
        f"{summary['extra_click_ms_median']} |"
    )
    return summary


if __name__ == "__main__":
    main()
