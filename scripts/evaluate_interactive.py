"""The interactive protocol through the bundle's own inferer: Dice and NSD per click on 2D images or 3D volumes.

    python scripts/evaluate_interactive.py --datalist ../shared/data2d/datalist.json --json eval/clicks_2d.json \\
        --chart eval/clicks_2d.png
    python scripts/evaluate_interactive.py --volumes ../shared/data --json eval/clicks_3d.json --chart eval/clicks_3d.png
    python scripts/evaluate_interactive.py --datalist ../shared/data2d/datalist.json --datasets busi_breast_us \\
        --override weights=eval/clicks.pt    # any configs/inference.json id (a scripts/train_click_decoder.py output)

The inferer is ``inferer`` of ``configs/inference.json`` (``--config`` for another or an override file, ``--override
id=value`` for its ids, values read as JSON), built with :func:`bundle.config.bundle_parser` exactly as the CLI and
the MONAI Label server build it. Each case is loaded with :func:`bundle.io.load_image`, normalised for its modality
(:func:`bundle.inferers.normalized_volume`) and cut into the inferer's slices (``to_slices``, slices along the last
axis of a volume), as the CLI does.

Protocol (every click figure in docs/benchmarks.md):

- step 0: the ground truth's bounding box (all its voxels: a 3D box ``[i0, j0, k0, i1, j1, k1]`` for a volume, a
  2D box for an image);
- steps 1..5: one click each at the point farthest inside the largest connected error region
  (:func:`bundle.transforms.protocol_click`: 3D components and mm distances for volumes, pixels for 2D images),
  foreground on a miss, background on a false positive; every step sends the box and all clicks so far;
- SAM-Med2D's point-only variant: no box; the first click at the deepest point of the object, then the same
  corrective clicks; Dice after 1, 3 and 5 clicks.

Dice and NSD (2 mm with the image's spacing; for 2D images, whose files carry no spacing, 2 pixels of the 256 x 256
network frame, i.e. the image's longest side / 128 pixels) are MONAI's
``compute_dice`` / ``compute_surface_dice`` on the original grid. The area under the Dice-vs-clicks curve (AUC) is
the trapezoidal area over clicks 0..5 divided by 5 (so it lies in [0, 1], 1 for a perfect mask from the box on).
Latency is the inferer call per step, on one thread of the process (``--threads``), with the embeddings of the
case encoded at step 0; by default each case has one interaction session as the MONAI Label server keeps one per
image and object (``--stateless`` replays every request from the box instead, as the CLI does).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the real scans of ../shared/data: case -> (modality, file suffix); spleen1 is CC BY-SA (evaluation only)
VOLUME_CASES = {
    "lung1": ("ct", ".nrrd"),
    "brain1": ("mr", ".nrrd"),
    "breast1": ("mr", ".nrrd"),
    "spleen1": ("ct", ".nii.gz"),
}
DEFAULT_CASES = ("lung1", "brain1", "breast1")
STEPS = 5
POINT_COUNTS = (1, 3, 5)


# ------------------------------------------------------------------------------------------------------------- data
def read_cases(args) -> list[dict]:
    """``{"image", "label", "modality", "dataset"}`` items from ``--datalist`` or ``--volumes``, filtered."""
    items = []
    if args.datalist:
        base = Path(args.datalist).resolve().parent
        for item in json.loads(Path(args.datalist).read_text()):
            resolved = {k: str(base / item[k]) if k in ("image", "label") else item[k] for k in item}
            resolved.setdefault("dataset", Path(item["image"]).parts[0])
            items.append(resolved)
    if args.volumes:
        for case in args.cases or DEFAULT_CASES:
            if case not in VOLUME_CASES:
                raise SystemExit(f"--cases: unknown case {case!r}; expected some of {sorted(VOLUME_CASES)}")
            folder = Path(args.volumes)
            modality, suffix = VOLUME_CASES[case]
            items.append(
                {
                    "image": str(folder / f"{case}_image{suffix}"),
                    "label": str(folder / f"{case}_label{suffix}"),
                    "modality": modality,
                    "dataset": case,
                }
            )
    if args.datasets:
        items = [item for item in items if item["dataset"] in args.datasets]
    if not items:
        raise SystemExit("no cases: give --datalist FILE and/or --volumes DIR (and --datasets that exist)")
    for item in items:
        for key in ("image", "label"):
            if not Path(item[key]).exists():
                raise SystemExit(f"{item[key]}: not found ({key} of a case)")
    return items


class Case:
    """One image and its ground truth in the inferer's slice layout, with its prompts' index space."""

    def __init__(self, item: dict) -> None:
        from bundle.inferers import normalized_volume, to_slices
        from bundle.io import load_image

        image = load_image(item["image"])
        label = load_image(item["label"])
        self.name = Path(item["image"]).name
        self.dataset = item["dataset"]
        self.spatial = tuple(image.shape[1:])
        if tuple(label.shape[1:]) != self.spatial:
            raise SystemExit(f"{item['label']}: shape {tuple(label.shape[1:])} differs from its image's {self.spatial}")
        self.is_3d = len(self.spatial) == 3
        self.axis = 2 if self.is_3d else None
        self.truth = np.asarray(label[0]) > 0 if label.shape[0] == 1 else np.asarray(label).max(0) > 127
        if not self.truth.any():
            raise SystemExit(f"{item['label']}: empty ground truth")
        pixdim = [float(v) for v in getattr(image, "pixdim", [1.0] * len(self.spatial))]
        # NSD tolerance 2 mm for volumes; 2D files carry no spacing: 2 pixels of the network's 256 frame
        self.spacing = pixdim[: len(self.spatial)] if self.is_3d else [256.0 / max(self.spatial)] * 2
        normalized = normalized_volume(image, item["modality"], source=item["image"])
        self.volume = to_slices(normalized, self.axis or 0)
        self.image_id = (os.path.abspath(item["image"]), item["modality"])
        coords = np.nonzero(self.truth)
        self.box = [int(c.min()) for c in coords] + [int(c.max()) for c in coords]

    def prediction(self, mask: np.ndarray) -> np.ndarray:
        from bundle.inferers.volume import from_slices

        return from_slices(mask, self.spatial, self.axis or 0)


# --------------------------------------------------------------------------------------------------------- protocol
class Protocol:
    """Runs the protocol's requests through one inferer."""

    def __init__(self, inferer, stateless: bool = False) -> None:
        self.inferer = inferer
        self.stateful = not stateless and "session" in inspect.signature(inferer.segment_volume).parameters

    def _new_session(self):
        from bundle.inferers import InteractionSession

        return InteractionSession() if self.stateful else None

    def _segment(self, case: Case, session, box, clicks, labels):
        from bundle.inferers import plan_prompts

        plan = plan_prompts(
            case.spatial,
            box=box,
            points=clicks or None,
            point_labels=labels or None,
            axis=case.axis,
            source=case.name,
        )
        kwargs = {"session": session} if self.stateful else {}
        start = time.perf_counter()
        mask, _ = self.inferer.segment_volume(case.volume, plan, image_id=case.image_id, **kwargs)
        elapsed = time.perf_counter() - start
        return case.prediction(mask), elapsed

    def run(self, case: Case, box, steps: int) -> dict:
        """Steps 0..``steps`` from ``box`` (``None``: point-only, the first click at the object's deepest point)."""
        from bundle.transforms import protocol_click

        session = self._new_session()
        clicks, labels = [], []
        dice, nsd, seconds = [], [], []
        pred = np.zeros_like(case.truth)
        for step in range(steps + 1):
            if box is None and step == 0:
                index, label = protocol_click(pred, case.truth, case.spacing)
                clicks.append(list(index))
                labels.append(label)
                continue
            pred, elapsed = self._segment(case, session, box, clicks, labels)
            d, n = cropped_scores(pred, case.truth, case.spacing)
            dice.append(d)
            nsd.append(n)
            seconds.append(elapsed)
            if step == steps:
                break
            index, label = protocol_click(pred, case.truth, case.spacing)
            if index is None:  # perfect: nothing left to click
                dice += [d] * (steps - step)
                nsd += [n] * (steps - step)
                break
            clicks.append(list(index))
            labels.append(label)
        return {"dice": dice, "nsd": nsd, "seconds": seconds, "clicks": clicks, "labels": labels}


def cropped_scores(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[float, float]:
    """:func:`dice_nsd` on the bounding box of both masks plus a margin wider than the NSD tolerance (the same
    figures, computed on a fraction of a large photo's pixels)."""
    both = pred | truth
    coords = np.nonzero(both)
    margin = [int(np.ceil(4.0 / s)) + 2 for s in spacing]
    crop = tuple(
        slice(max(0, int(c.min()) - m), min(n, int(c.max()) + m + 1)) for c, m, n in zip(coords, margin, both.shape)
    )
    from bundle.inferers import dice_nsd

    return dice_nsd(pred[crop], truth[crop], spacing)


def auc(dice: list[float]) -> float:
    """Trapezoidal area under Dice against clicks 0..n, divided by n."""
    values = np.asarray(dice, dtype=np.float64)
    return float(((values[1:] + values[:-1]) / 2).mean())


def evaluate_case(protocol: Protocol, case: Case, steps: int, point_counts) -> dict:
    row = {"case": case.name, "dataset": case.dataset, "box": case.box, "voxels": int(case.truth.sum())}
    boxed = protocol.run(case, case.box, steps)
    row.update(
        dice=boxed["dice"],
        nsd=boxed["nsd"],
        seconds=boxed["seconds"],
        clicks=boxed["clicks"],
        click_labels=boxed["labels"],
        auc=auc(boxed["dice"]),
    )
    if point_counts:
        points = protocol.run(case, None, max(point_counts))
        row["points_dice"] = {n: points["dice"][n - 1] for n in point_counts}
        row["points_nsd"] = {n: points["nsd"][n - 1] for n in point_counts}
        row["points_seconds"] = points["seconds"]
    return row


# ---------------------------------------------------------------------------------------------------------- summary
def summarise(rows: list[dict], tolerance: float = 0.01) -> dict:
    """Per dataset and over all cases: mean Dice per step, AUC, NSD, cases ending below their box Dice."""
    groups = {name: [r for r in rows if r["dataset"] == name] for name in dict.fromkeys(r["dataset"] for r in rows)}
    groups["all"] = rows
    out = {}
    for name, group in groups.items():
        dice = np.array([r["dice"] for r in group])
        change = dice[:, -1] - dice[:, 0]
        entry = {
            "cases": len(group),
            "dice": dice.mean(0).round(4).tolist(),
            "nsd": np.array([r["nsd"] for r in group]).mean(0).round(4).tolist(),
            "auc": round(float(np.mean([r["auc"] for r in group])), 4),
            "gain": round(float(change.mean()), 4),
            "below_box": int((change < -tolerance).sum()),
            "worst_change": round(float(change.min()), 4),
            "click_ms": round(1000 * statistics.median(s for r in group for s in r["seconds"][1:]), 1)
            if any(len(r["seconds"]) > 1 for r in group)
            else None,
            "box_ms": round(1000 * statistics.median(r["seconds"][0] for r in group), 1),
        }
        if "points_dice" in group[0]:
            entry["points_dice"] = {
                n: round(float(np.mean([r["points_dice"][n] for r in group])), 4) for n in group[0]["points_dice"]
            }
            # a click alone, the image's features cached by the box run: what box_scan costs
            entry["first_point_ms"] = round(1000 * statistics.median(r["points_seconds"][0] for r in group), 1)
        out[name] = entry
    return out


def markdown(summary: dict) -> str:
    steps = len(summary["all"]["dice"]) - 1
    head = ["dataset", "cases", "box Dice"] + [f"{n} click{'s' * (n > 1)}" for n in range(1, steps + 1)]
    head += ["AUC", "NSD box / final", "below box", "worst change", "points 1 / 3 / 5", "click ms", "first point ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, s in summary.items():
        points = " / ".join(f"{v:.3f}" for v in s["points_dice"].values()) if "points_dice" in s else "-"
        cells = [f"**{name}**" if name == "all" else name, str(s["cases"])] + [f"{v:.3f}" for v in s["dice"]]
        cells += [
            f"{s['auc']:.3f}",
            f"{s['nsd'][0]:.3f} / {s['nsd'][-1]:.3f}",
            str(s["below_box"]),
            f"{s['worst_change']:+.3f}",
            points,
            "-" if s["click_ms"] is None else f"{s['click_ms']:.0f}",
            f"{s['first_point_ms']:.0f}" if "first_point_ms" in s else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_chart(summary: dict, path: Path, title: str) -> None:
    """PNG: mean Dice against clicks per dataset (solid: box then clicks; dotted: point-only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bundle.io import atomic_write

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, s in summary.items():
        style = {"linewidth": 2.5, "color": "black"} if name == "all" else {"linewidth": 1.2}
        line = axes.plot(range(len(s["dice"])), s["dice"], marker="o", label=name, **style)[0]
        if "points_dice" in s:
            counts = [int(n) for n in s["points_dice"]]
            axes.plot(counts, list(s["points_dice"].values()), linestyle=":", marker="x", color=line.get_color())
    axes.set_xlabel("clicks after the box (dotted: clicks without a box)")
    axes.set_ylabel("mean Dice")
    axes.set_ylim(0, 1)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--override {text!r}: expected id=value")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_inferer(config: list[str], overrides: dict):
    """``inferer`` of the bundle config(s), with the config's CPU tuning, as the CLI and MONAI Label build it."""
    from bundle.config import bundle_parser

    parser = bundle_parser(config, ROOT, overrides)
    parser.get_parsed_content("initialize")
    return parser.get_parsed_content("inferer")


def parse_variant(values: list[str]) -> tuple[str, dict]:
    name, *pairs = values
    return name, dict(parse_override(p) for p in pairs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datalist", help="JSON list of {image, label, modality, dataset} (2D images or volumes)")
    parser.add_argument("--volumes", help="folder of the real scans (<case>_image.nrrd or .nii.gz, <case>_label...)")
    parser.add_argument(
        "--cases", nargs="*", help=f"cases of --volumes: {', '.join(VOLUME_CASES)} (default {' '.join(DEFAULT_CASES)})"
    )
    parser.add_argument("--datasets", nargs="*", help="only the cases of these datasets")
    parser.add_argument("--config", nargs="+", default=["configs/inference.json"], help="bundle config file(s)")
    parser.add_argument("--override", type=parse_override, action="append", default=[], help="config id=value")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar="NAME [id=value ...]",
        help="compare several settings (each NAME with its overrides, on top of --override) on the same cases",
    )
    parser.add_argument("--steps", type=int, default=STEPS, help="corrective clicks after the box (default 5)")
    parser.add_argument("--points", type=int, nargs="*", default=list(POINT_COUNTS), help="point-only click counts")
    parser.add_argument("--stateless", action="store_true", help="replay every request from the box (as the CLI)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the summary and per-case rows here")
    parser.add_argument("--chart", type=Path, help="write a PNG chart of Dice against clicks here")
    parser.add_argument("--label", default="", help="name of this run in the chart title and the JSON")
    args = parser.parse_args(argv)
    if args.points and (min(args.points) < 1 or max(args.points) > args.steps):
        parser.error(f"--points must lie in 1..{args.steps}")

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    base = dict(args.override)
    variants = [parse_variant(v) for v in args.variant] if args.variant else [(args.label or "run", {})]
    cases = [Case(item) for item in read_cases(args)]
    results = {}
    cache = None
    for name, extra in variants:
        overrides = {**base, **extra}
        inferer = build_inferer(args.config, overrides)
        if cache is None:
            cache = inferer.cache
        inferer.cache = cache  # the same embeddings for every variant (same encoder)
        protocol = Protocol(inferer, stateless=args.stateless)
        rows = []
        start = time.perf_counter()
        for case in cases:
            row = evaluate_case(protocol, case, args.steps, args.points)
            rows.append(row)
            points = " ".join(f"{n}:{v:.3f}" for n, v in row.get("points_dice", {}).items())
            print(
                f"{name[:18]:>18} {case.dataset:>20} {case.name[:32]:<32} Dice "
                + " ".join(f"{v:.3f}" for v in row["dice"]),
                f"| points {points}",
                flush=True,
            )
        summary = summarise(rows)
        print(f"\n{name}: {len(rows)} cases in {time.perf_counter() - start:.0f} s; overrides {overrides}")
        print(markdown(summary) + "\n", flush=True)
        results[name] = {"overrides": overrides, "summary": summary, "rows": rows}
    if len(results) > 1:
        print(compare(results))
    record = {
        "label": args.label,
        "command": "python scripts/evaluate_interactive.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}",
        "config": args.config,
        "stateless": args.stateless,
        "variants": results,
    }
    if args.json:
        from bundle.io import atomic_write

        args.json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
    if args.chart:
        if len(results) == 1:
            ((name, result),) = results.items()
            write_chart(result["summary"], args.chart, args.label or name)
        else:
            write_chart({name: r["summary"]["all"] for name, r in results.items()}, args.chart, args.label)
    return 0


def compare(results: dict) -> str:
    """One row per variant: the mean over all cases."""
    head = "| setting | box Dice | 5 clicks | gain | AUC | below box | worst change | points 1 / 3 / 5 | click ms |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, result in results.items():
        s = result["summary"]["all"]
        points = " / ".join(f"{v:.3f}" for v in s["points_dice"].values()) if "points_dice" in s else "-"
        lines.append(
            f"| {name} | {s['dice'][0]:.3f} | {s['dice'][-1]:.3f} | {s['gain']:+.3f} | {s['auc']:.3f} | "
            f"{s['below_box']} of {s['cases']} | {s['worst_change']:+.3f} | {points} | {s['click_ms']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
