#!/usr/bin/env python
"""Latency of the SAM-UNet MONAI Label server over HTTP: first request on a slice vs. cached clicks.

Starts the app on a free loopback port (or uses ``--url``), uploads a volume through MONAI Label's client, then
times, end to end from the client (request, multipart answer, label file saved):

- ``first``: a box on a slice nobody has encoded yet (image encoder + decoder; the volume is loaded too);
- ``cached_click``: box + foreground clicks on the same slice, one more per request as 3D Slicer sends them (the
  embedding comes from the cache; the object's interaction session holds the mask of the earlier clicks, so only
  the new click is decoded, which is checked);
- ``box_3d``: a 3D box over the lesion's slices (for reference).

Example::

    python scripts/benchmark_label.py --threads 2 --output eval/benchmark_label.json
    python scripts/benchmark_label.py --volume full      # the whole 512 x 512 x 48 CT from ../shared/data

Prints a Markdown table row set for docs/benchmarks.md.
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

# volume presets: file, Slicer roi [x0, x1, y0, y1, z0, z1] around the tumour, slice, a click inside it
VOLUMES = {
    "crop": (REPO / "tests" / "data" / "lung1_crop_image.nrrd", [34, 61, 33, 62, 2, 4], 3, [47, 47]),
    "full": (REPO.parent / "shared" / "data" / "lung1_image.nrrd", [204, 231, 345, 374, 32, 34], 33, [217, 359]),
}


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {
        "n": len(values),
        "median_ms": round(1000 * statistics.median(values), 1),
        "p90_ms": round(1000 * p90, 1),
        "min_ms": round(1000 * ordered[0], 1),
        "max_ms": round(1000 * ordered[-1], 1),
    }


def run(url: str, image: Path, roi: list[int], slice_index: int, click: list[int], clicks: int, workdir: Path) -> dict:
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(url, tmpdir=str(workdir / "client"))
    image_id = f"bench_{int(time.time())}"
    t0 = time.perf_counter()
    client.upload_image(str(image), image_id)
    upload = time.perf_counter() - t0

    def timed(params):
        start = time.perf_counter()
        path, result = client.infer("sam_unet", image_id, params)
        elapsed = time.perf_counter() - start
        os.unlink(path)
        return elapsed, result

    first, first_result = timed({"roi": roi, "slice": slice_index})
    if first_result["encoded_slices"] != 1:
        raise RuntimeError(f"the first request should encode one slice, got {first_result}")
    cached, server_side, cpu = [], [], []
    for n in range(clicks):
        clicks_so_far = [[click[0] + m % 5 - 2, click[1] + m // 5 % 5 - 2, slice_index] for m in range(n + 1)]
        elapsed, result = timed({"roi": roi, "foreground": clicks_so_far})
        if result["encoded_slices"] != 0 or result["decoded_slices"] != 1:
            raise RuntimeError(f"click {n} was not served from the cache and the session: {result}")
        cached.append(elapsed)
        server_side.append(result["latencies"]["total"])
        cpu.append(result.get("cpu_s", float("nan")))
    box_3d, result_3d = timed({"roi": roi, "mode": "3d"})
    return {
        "upload_s": round(upload, 3),
        "first_request_ms": round(1000 * first, 1),
        "first_request_server_ms": round(1000 * first_result["latencies"]["total"], 1),
        "cached_click": summary(cached),
        "cached_click_server": summary(server_side),
        "cached_click_server_cpu": summary(cpu),
        "first_request_server_cpu_ms": round(1000 * first_result.get("cpu_s", float("nan")), 1),
        "box_3d_ms": round(1000 * box_3d, 1),
        "box_3d_encoded_slices": result_3d["encoded_slices"],
        "model_version": first_result["model_version"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--volume", choices=sorted(VOLUMES), default="crop", help="preset volume (default: the 96x96x8 test crop)"
    )
    parser.add_argument("--url", help="use a running server instead of starting one")
    parser.add_argument("--clicks", type=int, default=20, help="cached clicks to time (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of the started server")
    parser.add_argument("--device", default=None, help="device of the started server (cpu, cuda)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)

    image, roi, slice_index, click = VOLUMES[args.volume]
    if not image.is_file():
        parser.error(f"{image} not found")
    with tempfile.TemporaryDirectory(prefix="bench_label_") as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        if args.url:
            results = run(args.url, image, roi, slice_index, click, args.clicks, workdir)
        else:
            from bundle.label.launch import LabelServer

            conf = {}
            if args.threads:
                conf["threads"] = str(args.threads)
            if args.device:
                conf["device"] = args.device
            (workdir / "studies").mkdir()
            with LabelServer(workdir / "studies", workdir / "server", conf=conf) as server:
                results = run(server.url, image, roi, slice_index, click, args.clicks, workdir)
                results["server_start_s"] = round(time.perf_counter() - start, 1)
    results.update(
        {
            "volume": args.volume,
            "image": os.path.relpath(image, REPO),
            "cpu_count": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "threads": args.threads,
            "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    )
    print(json.dumps(results, indent=1))
    c = results["cached_click"]
    print(
        "\n| volume | threads | load (1 min) | first request | cached click, HTTP median (p90) | server wall | "
        "server CPU: first / cached click | 3D box |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.volume} | {args.threads or 'default'} | {results['load_average_1m']} | {results['first_request_ms']:.0f} ms | "
        f"{c['median_ms']:.0f} ms ({c['p90_ms']:.0f}) | {results['cached_click_server']['median_ms']:.0f} ms | "
        f"{results['first_request_server_cpu_ms']:.0f} / {results['cached_click_server_cpu']['median_ms']:.0f} ms | "
        f"{results['box_3d_ms']:.0f} ms |"
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
