"""Prompt-free task models fine-tuned from LiteMedSAM, by k-fold cross-validation over the images, against zero-shot
LiteMedSAM with ground-truth boxes on the same images.

    python scripts/evaluate_task_models.py [--data-dir ../shared/data2d] [--folds 4] [--views 6] [--epochs 10]
        [--no-prompt box learned] [--threads 2] [--json FILE]

Per dataset (``hc18_fetal_head_us``, fetal heads; ``busi_breast_us``, breast lesions) the images are split into
``--folds`` folds by image. The task model is ``configs/train.json`` + ``configs/train_auto.json`` as a user runs it
(the configs are parsed here with overrides, not copied): LiteMedSAM's frozen encoder, its prompt encoder and mask
decoder trained with no prompt (the whole-image box) on 256 x 256 windows at the dataset's chosen spacing
(``--spacing``), augmented with the config's MONAI transforms; the encoder's outputs of ``--views`` augmented
windows per image are computed once (``EncodedViews``) and shared by every fold, since the encoder is frozen. Each
fold starts again from LiteMedSAM, trains ``--epochs`` passes over its training images' windows with the config's
SupervisedTrainer, and is evaluated on its held-out images by the evaluation part of the configs
(``evaluate.json`` + ``train_auto.json``: sliding windows at the chosen spacing, gaussian blending, inverted back to
the original grid, Dice at the original resolution). The zero-shot baseline is the bundle's default prompted path
(LiteMedSAM, the whole image resized to 256, the mask's bounding box) on the same images.

``--no-prompt learned`` also trains each fold with a learned "no prompt": two free prompt tokens instead of the
whole-image box's corner embeddings (same start values), to measure whether a learned prompt beats the box.
CPU seconds (``time.process_time``) and wall seconds are reported per phase.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_windows import dice, frame_logits, load_item, tight_box  # noqa: E402

DATASETS = ("hc18_fetal_head_us", "busi_breast_us")
SPACING = {"hc18_fetal_head_us": 3.2, "busi_breast_us": 2.0}
CONFIGS = ["configs/train.json", "configs/evaluate.json", "configs/train_auto.json"]


class LearnedPrompt(nn.Module):
    """A task decoder whose prompt is two free tokens, started at the whole-image box's sparse embedding (the box's
    two corner tokens: positional encoding of the corner + SAM's learned corner embedding)."""

    def __init__(self, decoder) -> None:
        super().__init__()
        self.decoder = decoder
        self.extra_keys = decoder.extra_keys
        with torch.no_grad():
            self.tokens = nn.Parameter(self.box_tokens(decoder.network).clone())

    @staticmethod
    def box_tokens(network) -> torch.Tensor:
        size = network.image_size
        box = torch.tensor([[0.0, 0.0, size - 1.0, size - 1.0]])
        return network.prompt_encoder(points=None, boxes=box, masks=None)[0]

    def forward(self, embedding, *intermediates):
        network = self.decoder.network
        features = network.fuse(embedding, list(intermediates))
        dense = network.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        low = network.mask_decoder(
            features["embedding"],
            network.prompt_encoder.get_dense_pe(),
            self.tokens.expand(embedding.shape[0], -1, -1),
            dense.expand(embedding.shape[0], -1, *embedding.shape[-2:]),
            features.get("multi_scale"),
        )
        return network.upsample_logits(low)

    @torch.no_grad()
    def fold_into_network(self) -> None:
        """Move the learned tokens into the box corners' learned embeddings, so that the network's own no-prompt
        call (the whole-image box) gives exactly these tokens: the two parametrisations are the same."""
        network = self.decoder.network
        corners = network.prompt_encoder.point_embeddings
        shift = self.tokens[0] - self.box_tokens(network)[0]
        corners[2].weight += shift[0]
        corners[3].weight += shift[1]


def folds_of(n: int, k: int) -> list[list[int]]:
    """Image indices split into ``k`` folds, every ``k``-th image in one fold (datalist order)."""
    return [list(range(f, n, k)) for f in range(k)]


def parser_for(workdir: Path, dataset_dir: Path, spacing: float, overrides: dict | None = None):
    from bundle.config import bundle_parser

    return bundle_parser(
        CONFIGS,
        ROOT,
        {
            "bundle_root": str(workdir),
            "dataset_dir": str(dataset_dir),
            "spacing": [spacing, spacing],
            "ckpt_path": "",
            "progress_bar": False,
            "val_interval": 10**6,
            **(overrides or {}),
        },
    )


def encode_views(items, spacing: float, views: int, workdir: Path, dataset_dir: Path) -> list:
    """Per image, ``views`` augmented windows through the frozen encoder (train_auto.json's pipeline)."""
    from bundle.data import EncodedViews

    parser = parser_for(workdir, dataset_dir, spacing)
    encoder = parser.get_parsed_content("train#model")
    transform = parser.get_parsed_content("train#preprocessing")
    return [EncodedViews([item], transform, encoder, views=views, seed=index) for index, item in enumerate(items)]


def train_and_evaluate(train_sets, held_out, spacing, args, workdir, dataset_dir, no_prompt: str) -> dict:
    """One fold: a fresh task model trained on the cached windows of its images, evaluated on the held-out ones."""
    from torch.utils.data import ConcatDataset

    parser = parser_for(
        workdir,
        dataset_dir,
        spacing,
        {
            "train#dataset": ConcatDataset(train_sets),
            "max_epochs": args.epochs,
            "lr_milestones": [args.epochs],
            "batch_size": args.batch_size,
            "datalist": held_out,
            "validate#datalist": held_out,  # ValidationHandler needs an evaluator; val_interval keeps it idle
        },
    )
    if no_prompt == "learned":
        parser["train#model"] = (
            "$__import__('evaluate_task_models').LearnedPrompt(bundle.networks.FeatureDecoder(@network))"
        )
        parser["optimizer#params"] = "$[p for p in @train#model.parameters() if p.requires_grad]"
    start, cpu = time.perf_counter(), time.process_time()
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    train_wall, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    if no_prompt == "learned":  # the evaluator's no-prompt call then uses the learned tokens
        parser.get_parsed_content("train#model").fold_into_network()
    start, cpu = time.perf_counter(), time.process_time()
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    details = evaluator.state.metric_details["mean_dice"].flatten().tolist()
    return {
        "dice": details,
        "train_steps": trainer.state.iteration,
        "train_wall_s": train_wall,
        "train_cpu_s": train_cpu,
        "eval_wall_s": time.perf_counter() - start,
        "eval_cpu_s": time.process_time() - cpu,
    }


@torch.no_grad()
def zero_shot(items, data_dir: Path) -> tuple[list[float], float]:
    """Dice of the default prompted path (LiteMedSAM, ground-truth box) per image, and the CPU seconds."""
    from bundle.config import bundle_parser

    network = bundle_parser("configs/inference.json", ROOT).get_parsed_content("network_def").eval()
    cpu = time.process_time()
    scores = []
    for item in items:
        image, mask = load_item(data_dir, item)
        scores.append(dice(frame_logits(network, image, tight_box(mask)).numpy() > 0, mask))
    return scores, time.process_time() - cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data2d")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--spacing", nargs="+", default=[], help="DATASET=PIXELS (default: hc18 3.2, busi 2.0 px per window pixel)"
    )
    parser.add_argument("--no-prompt", nargs="+", default=["box"], choices=["box", "learned"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spacing = {**SPACING, **{k: float(v) for k, v in (s.split("=") for s in args.spacing)}}

    from bundle.networks.cpu import tune_malloc

    tune_malloc()
    datalist = json.loads((args.data_dir / "datalist.json").read_text())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.datasets:
            items = [
                {**d, "image": str(args.data_dir / d["image"]), "label": str(args.data_dir / d["label"])}
                for d in datalist
                if d["dataset"] == name
            ]
            baseline, baseline_cpu = zero_shot(items, args.data_dir)
            start, cpu = time.perf_counter(), time.process_time()
            views = encode_views(items, spacing[name], args.views, workdir, args.data_dir)
            encode_wall, encode_cpu = time.perf_counter() - start, time.process_time() - cpu
            print(f"{name}: {len(items)} images, {args.views} views each encoded in {encode_wall:.0f} s", flush=True)
            for no_prompt in args.no_prompt:
                task = [None] * len(items)
                timing = {"train_wall_s": 0.0, "train_cpu_s": 0.0, "eval_wall_s": 0.0, "eval_cpu_s": 0.0, "steps": 0}
                for fold, held in enumerate(folds_of(len(items), args.folds)):
                    torch.manual_seed(fold)
                    train_sets = [views[i] for i in range(len(items)) if i not in held]
                    out = train_and_evaluate(
                        train_sets, [items[i] for i in held], spacing[name], args, workdir, args.data_dir, no_prompt
                    )
                    for i, score in zip(held, out["dice"]):
                        task[i] = score
                    for key in ("train_wall_s", "train_cpu_s", "eval_wall_s", "eval_cpu_s"):
                        timing[key] += out[key]
                    timing["steps"] = out["train_steps"]
                    print(
                        f"  {no_prompt} fold {fold}: held-out Dice {np.mean(out['dice']):.3f} "
                        f"(zero-shot {np.mean([baseline[i] for i in held]):.3f}), "
                        f"{out['train_steps']} steps in {out['train_wall_s']:.0f} s",
                        flush=True,
                    )
                results.append(
                    {
                        "dataset": name,
                        "images": len(items),
                        "spacing": spacing[name],
                        "no_prompt": no_prompt,
                        "task_dice": task,
                        "zero_shot_dice": baseline,
                        "encode_wall_s": encode_wall,
                        "encode_cpu_s": encode_cpu,
                        "zero_shot_cpu_s": baseline_cpu,
                        **timing,
                    }
                )
    print(
        "\n| dataset | images | folds | task model (no prompt), Dice mean ± sd | zero-shot LiteMedSAM + GT box, Dice | "
        "task model CPU s (encode / train / evaluate) | zero-shot CPU s |"
    )
    print("| --- | ---: | ---: | --- | ---: | --- | ---: |")
    for r in results:
        print(
            f"| {r['dataset']} ({r['no_prompt']}) | {r['images']} | {args.folds} | {np.mean(r['task_dice']):.3f} ± "
            f"{np.std(r['task_dice']):.3f} | {np.mean(r['zero_shot_dice']):.3f} ± {np.std(r['zero_shot_dice']):.3f} | "
            f"{r['encode_cpu_s']:.0f} / {r['train_cpu_s']:.0f} / {r['eval_cpu_s']:.0f} | {r['zero_shot_cpu_s']:.0f} |"
        )
    if args.json:
        from bundle.io import write_run_record

        argv = argv if argv is not None else sys.argv[1:]
        write_run_record(
            args.json,
            "scripts/evaluate_task_models.py",
            argv,
            args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            results=results,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
