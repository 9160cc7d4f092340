#!/usr/bin/env python
"""Benchmark several objects in one run against one run per object: wall time and encoded slices.

    python scripts/benchmark_objects.py [--image ../shared/data/lung1_image.nrrd] [--threads 2] [--repeats 2]

The bundle's volume inference (``VolumeInferenceRunner`` with ``configs/inference.json``'s inferer, the default
LiteMedSAM network, an empty embedding cache per run) on lung1 with two objects: the tumour (a box on slice 33,
propagated) and the vertebral body below it (a 3D box on slices 31-35). Once with both objects in one label map,
once per object; each the median of ``--repeats`` runs after a warm-up. Prints a markdown row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OBJECTS = [
    {"slice_box": [204, 345, 231, 374], "slice_index": 33, "name": "tumour"},
    {"box": [234, 365, 31, 288, 410, 35], "name": "vertebra"},
]


def timed(inferer, items, repeats: int) -> tuple[float, int]:
    """Median seconds and slices encoded per run of ``items``."""
    from bundle.inferers import VolumeInferenceRunner

    times, encoded = [], 0
    for _ in range(repeats):
        inferer.cache.clear()
        before = inferer.stats["encoded"]
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            VolumeInferenceRunner(inferer, items, out, modality="ct").run()
            times.append(time.perf_counter() - start)
        encoded = inferer.stats["encoded"] - before
    return statistics.median(times), encoded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=REPO.parent / "shared" / "data" / "lung1_image.nrrd")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from bundle.config import bundle_parser
    from bundle.networks.cpu import tune_malloc

    torch.set_num_threads(args.threads)
    tune_malloc()
    inferer = bundle_parser().get_parsed_content("inferer")
    image = str(args.image)
    together = [{"image": image, "objects": OBJECTS}]
    apart = [[{"image": image, **{k: v for k, v in o.items() if k != "name"}}] for o in OBJECTS]
    timed(inferer, together, 1)  # warm-up
    both_s, both_encoded = timed(inferer, together, args.repeats)
    alone = [timed(inferer, items, args.repeats) for items in apart]
    apart_s, apart_encoded = sum(t for t, _ in alone), sum(n for _, n in alone)
    record = {
        "image": args.image.name,
        "threads": args.threads,
        "together_s": both_s,
        "together_encoded": both_encoded,
        "apart_s": apart_s,
        "apart_encoded": apart_encoded,
        "per_object": [{"s": t, "encoded": n} for t, n in alone],
    }
    print(json.dumps(record, indent=2))
    print("| objects | one run: s, encoded slices | one run per object: s, encoded slices | speed-up |")
    print("| --- | --- | --- | --- |")
    print(
        f"| tumour + vertebra, {args.image.name} | {both_s:.1f} s, {both_encoded} | {apart_s:.1f} s, {apart_encoded} | "
        f"{apart_s / both_s:.2f}x |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
