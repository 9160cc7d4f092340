"""Does feeding a mask prompt to the decoder (``mask_inputs``) help? Dice with the switch off and on, on real data.

    python scripts/evaluate_mask_prompts.py [--data-dir ../shared/data] [--data2d-dir ../shared/data2d] [--json out.json]

A mask prompt gives every slice it covers the box of the mask there and, with the inferer's ``mask_inputs`` switch
on, the mask itself as the decoder's low-res ``mask_inputs`` (``SliceFrame.mask_to_low_res``). This measures, with
the bundle's default network (``network_def`` of ``configs/inference.json``: LiteMedSAM) and none of these cases
used to choose anything:

- **covered slices**: every lesion slice of lung1 (CT), brain1 and breast1 (MR) and the 41 images of ../shared/data2d,
  prompted by a mask derived from the ground truth: the ground truth itself, grown by 3 pixels, shrunk by 3 pixels,
  and the neighbouring slice's ground truth (a mask carried one slice, volumes only); Dice against the ground truth
  with the box alone (switch off) and with box and mask (switch on);
- **propagation**: each volume's ground truth on its largest slice as the mask prompt, propagated through the
  volume as inference does (``segment_volume``); 3D Dice with the switch off and on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {"lung1": "ct", "brain1": "mr", "breast1": "mr"}
VARIANTS = ("exact", "grown 3 px", "shrunk 3 px", "neighbour slice")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def variants(truth: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Masks derived from the ground truth on slice ``k`` of ``truth [A, B, K]``."""
    from scipy import ndimage

    here = truth[..., k]
    out = {
        "exact": here,
        "grown 3 px": ndimage.binary_dilation(here, iterations=3),
        "shrunk 3 px": ndimage.binary_erosion(here, iterations=3),
    }
    if truth.shape[-1] > 1:
        neighbours = [j for j in (k - 1, k + 1) if 0 <= j < truth.shape[-1] and truth[..., j].any()]
        if neighbours:
            out["neighbour slice"] = truth[..., neighbours[0]]
    return {name: m for name, m in out.items() if m.any()}


def covered_slices(inferer, volume: np.ndarray, truth: np.ndarray, case: str, transpose: bool) -> list[dict]:
    """Dice per lesion slice and mask variant, switch off and on (``transpose``: how the slices are shown)."""
    from bundle.inferers import SliceFrame, SlicePrompt, mask_plan

    frame = SliceFrame(volume.shape[-3:-1], inferer.image_size, transpose)
    slices = [k for k in range(truth.shape[-1]) if truth[..., k].any()]
    rows = []
    features = dict(zip(slices, inferer.features_for(volume, slices, case, 2, frame)))
    for k in slices:
        for name, mask in variants(truth, k).items():
            box = mask_plan(mask[..., None], 2).seeds[0].box
            row = {"case": case, "slice": k, "variant": name}
            for switch in (False, True):
                inferer.mask_inputs = switch
                logits = inferer.decode([features[k]], [SlicePrompt(box=box, mask=mask)], frame)[0]
                row["on" if switch else "off"] = dice((logits > 0).numpy(), truth[..., k])
            rows.append(row)
    inferer.mask_inputs = False
    return rows


def propagation(inferer, volume: np.ndarray, truth: np.ndarray, case: str) -> dict:
    """The ground truth on its largest slice as the mask prompt, propagated: 3D Dice, switch off and on."""
    from bundle.inferers import mask_plan

    k = int(np.argmax(truth.sum(axis=(0, 1))))
    seed = np.zeros_like(truth)
    seed[..., k] = truth[..., k]
    row = {"case": case, "seed_slice": k, "lesion_slices": int(truth.any(axis=(0, 1)).sum())}
    for switch in (False, True):
        inferer.mask_inputs = switch
        mask, _ = inferer.segment_volume(volume, mask_plan(seed, 2), image_id=case)
        row["on" if switch else "off"] = dice(mask, truth)
    inferer.mask_inputs = False
    return row


def load_cases(data_dir: Path, data2d_dir: Path | None):
    """``(name, [A, B, K] or [3, A, B, K] volume in [0, 255], [A, B, K] bool truth, is_volume)`` per case."""
    from bundle.inferers import load_mask_prompt, normalized_volume, to_slices
    from bundle.io import load_image

    for case, modality in CASES.items():
        image = load_image(data_dir / f"{case}_image.nrrd")
        truth = load_mask_prompt(data_dir / f"{case}_label.nrrd", image.shape[1:]) > 0
        yield case, to_slices(normalized_volume(image, modality, case), 2), truth, True
    if data2d_dir is None:
        return
    for item in json.loads((data2d_dir / "datalist.json").read_text()):
        image = load_image(data2d_dir / item["image"])
        truth = load_mask_prompt(data2d_dir / item["label"], image.shape[1:]) > 0
        volume = to_slices(normalized_volume(image, item["modality"], item["image"]), 2)
        yield f"{item['dataset']}/{Path(item['image']).stem}", volume, truth[..., None], False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--data2d-dir", type=Path, default=ROOT.parent / "shared" / "data2d")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from bundle.config import bundle_parser
    from bundle.networks.cpu import tune_malloc

    torch.set_num_threads(args.threads)
    tune_malloc()
    inferer = bundle_parser().get_parsed_content("inferer")
    start = time.perf_counter()
    covered, propagated = [], []
    data2d = args.data2d_dir if (args.data2d_dir / "datalist.json").is_file() else None
    for case, volume, truth, is_volume in load_cases(args.data_dir, data2d):
        # a 2D image [x, y] is shown upright (rows = y), as the CLI shows it
        covered += covered_slices(inferer, volume, truth, case, transpose=inferer.transpose or not is_volume)
        if is_volume:
            propagated.append(propagation(inferer, volume, truth, case))
        inferer.cache.clear()
    elapsed = time.perf_counter() - start

    print(f"{len(covered)} prompted slices in {elapsed:.0f} s; Dice, mask_inputs off -> on")
    print("| mask prompt | data | slices | Dice off | Dice on | on better / worse |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    summary = {}
    for variant in VARIANTS:
        for group, keep in (
            ("3D cases", lambda r: r["case"] in CASES),
            ("2D images", lambda r: r["case"] not in CASES),
        ):
            rows = [r for r in covered if r["variant"] == variant and keep(r)]
            if not rows:
                continue
            off, on = np.mean([r["off"] for r in rows]), np.mean([r["on"] for r in rows])
            better = sum(r["on"] > r["off"] + 1e-6 for r in rows)
            worse = sum(r["on"] < r["off"] - 1e-6 for r in rows)
            summary[f"{variant} / {group}"] = {"n": len(rows), "off": off, "on": on, "better": better, "worse": worse}
            print(f"| {variant} | {group} | {len(rows)} | {off:.3f} | {on:.3f} | {better} / {worse} |")
    print("\n| propagated from the largest slice | lesion slices | 3D Dice off | 3D Dice on |")
    print("| --- | ---: | ---: | ---: |")
    for r in propagated:
        print(f"| {r['case']} (seed slice {r['seed_slice']}) | {r['lesion_slices']} | {r['off']:.3f} | {r['on']:.3f} |")
    if args.json:
        record = {
            "command": "python " + " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "date": datetime.date.today().isoformat(),
            "machine": platform.processor() or platform.machine(),
            "seconds": elapsed,
            "summary": summary,
            "propagation": propagated,
            "rows": covered,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
