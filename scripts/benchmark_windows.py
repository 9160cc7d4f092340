"""A ground-truth box on large 2D images: the whole-image path (resized to the network's 256) against windows at the
image's own or a chosen resolution.

    python scripts/benchmark_windows.py [--data-dir ../shared/data2d] [--datasets isic2017_dermoscopy ...]
        [--methods frame box native] [--threads 2] [--json FILE]

For every image of the chosen ``datalist.json`` datasets (default: the dermoscopy photos and the two ultrasound sets)
the default network (``network_def`` of ``configs/inference.json``, LiteMedSAM) segments the mask's bounding box:

- ``frame``: the whole-image path of ``configs/inference.json`` (longest side resized to 256, bottom/right padding,
  the box scaled into that frame, the logits resized back);
- ``native``: :class:`bundle.inferers.BoxWindowInferer` at the image's own pixels: 256 x 256 windows over the box
  (plus 32 px of context), the box clipped to each window through ``sliding_window_inference(..., with_coord=True)``,
  gaussian blending, overlap 0.25;
- ``box``: the same windows at the resolution where the box's longest side is 192 px (three quarters of a window):
  one to four windows whatever the image size.

Dice (MONAI ``compute_dice``) of ``logits > 0`` against the mask on the original pixel grid, seconds per image
(network time included, image loading not), windows run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASETS = ("isic2017_dermoscopy", "busi_breast_us", "hc18_fetal_head_us")
METHODS = ("frame", "box", "native")
BOX_SIDE = 192  # px of the box's longest side in the "box" method


def load_item(data_dir: Path, item: dict) -> tuple[torch.Tensor, np.ndarray]:
    """The image ``[C, H, W]`` in [0, 255] as it is displayed (rows first) and its mask ``[H, W]``."""
    from PIL import Image

    image = np.asarray(Image.open(data_dir / item["image"]).convert("RGB"), dtype=np.float32)
    mask = np.asarray(Image.open(data_dir / item["label"]).convert("L")) > 127
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), mask


def tight_box(mask: np.ndarray) -> list[float]:
    """Inclusive XYXY box of all mask pixels."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


@torch.no_grad()
def frame_logits(network, image: torch.Tensor, box: list[float]) -> torch.Tensor:
    """The whole-image path: network frame, box scaled into it, logits back on the image grid ``[H, W]``."""
    from bundle.transforms import FromNetworkFrame, scale_box_to_frame

    hw = tuple(image.shape[-2:])
    size = network.image_size
    framed = network.preprocess(image[None])
    scaled = np.clip(scale_box_to_frame(np.asarray(box), hw, size), 0, size - 1)
    logits = network.decode(network.encode(framed), boxes=torch.tensor(scaled[None], dtype=torch.float32))
    return torch.as_tensor(FromNetworkFrame(size)(logits[0].float(), hw, mode="bilinear"))[0]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    from monai.metrics import compute_dice

    as_batch = lambda m: torch.as_tensor(m, dtype=torch.float32)[None, None]  # noqa: E731
    return float(compute_dice(as_batch(pred), as_batch(truth), include_background=True, ignore_empty=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data2d")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bundle.config import bundle_parser
    from bundle.inferers import BoxWindowInferer
    from bundle.networks.cpu import tune_malloc

    tune_malloc()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = bundle_parser("configs/inference.json", ROOT).get_parsed_content("network_def").to(device).eval()
    windows = BoxWindowInferer(network, device=device)
    items = [d for d in json.loads((args.data_dir / "datalist.json").read_text()) if d["dataset"] in args.datasets]
    rows = []
    for item in items:
        image, mask = load_item(args.data_dir, item)
        box = tight_box(mask)
        side = max(box[2] - box[0], box[3] - box[1]) + 1
        for method in args.methods:
            windows.windows_run = 0
            start = time.perf_counter()
            if method == "frame":
                logits = frame_logits(network, image.to(device), box)
            else:
                logits = windows(image, box, scale=1.0 if method == "native" else BOX_SIDE / side)
            seconds = time.perf_counter() - start
            row = {
                "dataset": item["dataset"],
                "image": item["image"],
                "hw": list(mask.shape),
                "box_side": side,
                "method": method,
                "dice": dice(logits.cpu().numpy() > 0, mask),
                "seconds": seconds,
                "windows": windows.windows_run if method != "frame" else 1,
            }
            rows.append(row)
            print(
                f"{row['dataset']} {Path(row['image']).name} {row['hw']} box {side:.0f}px {method}: "
                f"Dice {row['dice']:.3f}, {seconds:.1f} s, {row['windows']} windows",
                flush=True,
            )
    print("\n| dataset | images | method | mean Dice | s / image | windows / image |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    summary = []
    for name in args.datasets:
        for method in args.methods:
            group = [r for r in rows if r["dataset"] == name and r["method"] == method]
            if not group:
                continue
            entry = {
                "dataset": name,
                "method": method,
                "images": len(group),
                "dice": float(np.mean([r["dice"] for r in group])),
                "seconds": float(np.mean([r["seconds"] for r in group])),
                "windows": float(np.mean([r["windows"] for r in group])),
            }
            summary.append(entry)
            print(
                f"| {name} | {entry['images']} | {method} | {entry['dice']:.3f} | {entry['seconds']:.2f} | "
                f"{entry['windows']:.1f} |"
            )
    if args.json:
        from bundle.io import write_run_record

        argv = argv if argv is not None else sys.argv[1:]
        write_run_record(args.json, "scripts/benchmark_windows.py", argv, str(device), summary=summary, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
