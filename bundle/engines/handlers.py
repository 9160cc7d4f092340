"""Handlers for the SAM-UNet workflows: atomic checkpoints, the evaluation report, and a datalist file check."""

from __future__ import annotations

import csv
import heapq
import json
import logging
import math
import os
import textwrap
from collections import defaultdict
from collections.abc import Callable, Iterable, Sized
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from ignite.handlers import ProgressBar as IgniteProgressBar
from monai.handlers import CheckpointSaver

from bundle.io import atomic_write, remove_stale_temps
from bundle.networks.contract import CONTRACT_KEY

from .evaluator import parse_mode

__all__ = ["AtomicCheckpointSaver", "ProgressBar", "PromptEvaluationReport", "summarise", "validation_available"]

logger = logging.getLogger(__name__)

#: where ignite's ``Checkpoint(include_self=True)`` puts its record of the saved scores
TRACKER_KEY = "checkpointer"


class _AtomicDiskSaver(DiskSaver):
    """ignite's DiskSaver writing through :func:`bundle.io.atomic_write` (the bundle's one temp-and-rename writer,
    whose hidden temporary names a later run can recognise) with an optional fixed file name. A fixed name is
    overwritten in place by the rename, so ``remove`` is a no-op for it: there is never a moment without a complete
    checkpoint on disk."""

    def __init__(self, dirname: str, filename: str | None = None, wrap_key: str | None = None):
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        self.wrap_key = wrap_key

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        if self.wrap_key is not None:
            # ignite stores a lone object's state_dict bare (and its own record inside it); the bundle's files are
            # always {"model": state_dict, ...}
            checkpoint = dict(checkpoint)
            record = checkpoint.pop(TRACKER_KEY, None)
            checkpoint = {self.wrap_key: checkpoint, **({TRACKER_KEY: record} if record is not None else {})}
        super().__call__(checkpoint=checkpoint, filename=self.filename or filename, metadata=metadata)

    def _save_func(self, checkpoint, path, func) -> None:
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            func(checkpoint, f, **self.kwargs)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class ProgressBar(IgniteProgressBar):
    """ignite's tqdm ``ProgressBar`` configured entirely by its constructor, as bundle configs give handler arguments.

    ignite takes ``output_transform`` (what the bar shows, e.g. the loss) in ``attach``, while MONAI engines call
    ``handler.attach(engine)`` with no arguments; this keeps it from the constructor and passes it on (tqdm would
    reject it as a keyword of its own).
    """

    def __init__(
        self, output_transform: Callable | None = None, metric_names=None, persist: bool = False, **tqdm_kwargs
    ):
        super().__init__(persist=persist, **tqdm_kwargs)
        self.output_transform = output_transform
        self.metric_names = metric_names

    def attach(self, engine: Engine, metric_names=None, output_transform: Callable | None = None, **kwargs) -> None:
        super().attach(
            engine,
            metric_names=metric_names or self.metric_names,
            output_transform=output_transform or self.output_transform,
            **kwargs,
        )


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's CheckpointSaver with atomic writes (MONAI's own saver uses ``atomic=False``, so a kill during
    ``torch.save`` leaves a truncated file), the model contract, and a fixed file name for interval checkpoints
    (``interval_filename``, e.g. ``checkpoint_last.pt``, what a resumed run loads). Saves on rank 0 only under
    torch.distributed (ignite). The partial temporary files of a run killed while saving are removed at start.

    When ``save_dict`` holds a ``model`` with a model contract (a SAMUNet), its contract is saved beside it under
    ``network`` (:class:`bundle.networks.ContractEntry`), so ``models/model.pt`` is ``{"model": state_dict,
    "network": contract}`` and every entry point can build the network it belongs to. A ``save_dict`` with one
    entry otherwise is written as ``{key: state_dict}`` (ignite would write the bare state dict).

    The key-metric file also records the best score (ignite's ``checkpointer`` entry); with ``resume_key_metric`` a
    new saver continues from that record, so a resumed run keeps its best model unless it beats it.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        interval_filename: str | None = None,
        resume_key_metric: bool = False,
        **kwargs,
    ) -> None:
        from bundle.networks import ContractEntry, unwrap

        save_dict = dict(save_dict)
        model = save_dict.get("model")
        if model is not None and hasattr(unwrap(model), "contract") and CONTRACT_KEY not in save_dict:
            save_dict[CONTRACT_KEY] = ContractEntry(model)
        if kwargs.get("save_key_metric"):
            kwargs.setdefault("key_metric_save_state", True)  # the best score so far travels with the best model
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(save_dir)  # a run killed during torch.save left a partial hidden file
        wrap = next(iter(save_dict)) if len(save_dict) == 1 else None
        if self._final_checkpoint is not None:
            self._final_checkpoint.save_handler = _AtomicDiskSaver(save_dir, self._final_filename, wrap)
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.save_handler = _AtomicDiskSaver(
                save_dir, kwargs.get("key_metric_filename"), wrap
            )
        if self._interval_checkpoint is not None:
            self._interval_checkpoint.save_handler = _AtomicDiskSaver(save_dir, interval_filename, wrap)
        if resume_key_metric and self._key_metric_checkpoint is not None and kwargs.get("key_metric_filename"):
            self._restore_key_metric(Path(save_dir) / kwargs["key_metric_filename"])

    def _restore_key_metric(self, best: Path) -> None:
        """Continue the best-metric tracking of the run that wrote ``best``, so that a resumed run replaces the best
        model only with a better one (ignite's ``Checkpoint`` state, saved in the file as ``checkpointer``)."""
        if not best.is_file():
            return
        state = torch.load(best, map_location="cpu", weights_only=True).get(TRACKER_KEY)
        if not state or not state.get("_saved"):
            logger.warning("%s holds no best-metric record; the first validation after the resume replaces it", best)
            return
        self._key_metric_checkpoint.load_state_dict(state)
        logger.info("resumed the best-metric record of %s: %s", best, state["_saved"][-1][0])


# ------------------------------------------------------------------------------------------------------------ report
def validation_available(datalist: Sized, ckpt_dir: str | os.PathLike) -> bool:
    """Whether a training run has validation data; when it has none, says so (and what is saved instead).

    ``configs/train.json`` then disables its ``ValidationHandler`` and saves the final weights as
    ``<ckpt_dir>/model.pt`` (where the best-validation model would be), beside ``checkpoint_final.pt``.
    """
    if len(datalist):
        return True
    logger.warning(
        "the validation datalist is empty: training runs without validation, and its final weights are saved as %s",
        os.path.join(os.fspath(ckpt_dir), "model.pt"),
    )
    return False


def summarise(rows: Iterable[dict]) -> list[dict]:
    """Per (modality, mode) and per mode over all modalities ("all"): mask counts (empty ones included), mean /
    median / std Dice and mean NSD over the evaluated (non-empty) masks."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["modality"], row["mode"])].append(row)
        groups[("all", row["mode"])].append(row)
    out = []
    for (modality, mode), items in sorted(groups.items(), key=lambda kv: (kv[0][0] == "all", kv[0])):
        ok = [r for r in items if r["status"] == "ok"]
        dice = np.array([r["dice"] for r in ok], dtype=float)
        nsd = np.array([r["nsd"] for r in ok], dtype=float)
        out.append(
            {
                "modality": modality,
                "mode": mode,
                "n_masks": len(items),
                "n_empty": sum(r["status"] == "empty_mask" for r in items),
                "n_evaluated": len(ok),
                "dice_mean": float(np.nanmean(dice)) if len(ok) else math.nan,
                "dice_median": float(np.nanmedian(dice)) if len(ok) else math.nan,
                "dice_std": float(np.nanstd(dice)) if len(ok) else math.nan,
                "nsd_mean": float(np.nanmean(nsd)) if len(ok) and not np.isnan(nsd).all() else math.nan,
            }
        )
    return out


def _gather(obj):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, obj)
        return parts
    return [obj]


class PromptEvaluationReport:
    """Collects :class:`~bundle.engines.evaluator.SAMUNetEvaluator` rows and writes, at the end of each evaluation:

    - ``per_mask.csv``: one row per mask and prompt mode (empty masks with ``status=empty_mask``);
    - ``summary.csv`` / ``summary.json``: Dice and NSD per modality x mode and per mode over all modalities, with the
      number of masks, empty masks and evaluated masks;
    - ``dice_by_modality_mode.png``: bar chart of mean Dice by modality and mode;
    - ``worst/*.png``: overlays (ground truth green, prediction red) of the ``worst_k`` lowest-Dice masks per mode.

    Under torch.distributed the rows are gathered and rank 0 writes. Nothing is written when ``output_dir`` is None
    (the summary is still logged and kept in ``engine.state.prompt_summary``).
    """

    def __init__(self, output_dir: str | None, worst_k: int = 4, name: str | None = None) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.worst_k = int(worst_k)
        self.logger = logging.getLogger(name or __name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows: list[dict] = []
        self.worst: dict[str, list] = defaultdict(list)  # mode -> heap of (-dice, counter, overlay arrays)
        self._counter = 0

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        rows = output["rows"]
        self.rows.extend(rows)
        if not self.worst_k:
            return
        image = output["image"]
        masks = output["label"]
        lookup = {(r["mode"], r["flat_index"]): r for r in rows if r["status"] == "ok"}
        for mode, (keep, pred, prompt) in output.get("cases", {}).items():
            for row_i, mask_i in enumerate(keep.tolist()):
                row = lookup.get((mode, mask_i))
                if row is None or math.isnan(row["dice"]):
                    continue
                img = row["batch_image"]
                heap = self.worst[mode]
                entry_key = (-row["dice"], self._counter)
                self._counter += 1
                if len(heap) >= self.worst_k and entry_key <= heap[0][:2]:
                    continue
                arrays = (
                    _display_grey(image[img]),
                    masks[mask_i, 0].cpu().numpy() > 0.5,
                    pred[row_i, 0].cpu().numpy() > 0.5,
                    dict(row),
                    {name: value[row_i].tolist() for name, value in prompt.items()},
                )
                item = (entry_key[0], entry_key[1], arrays)
                if len(heap) < self.worst_k:
                    heapq.heappush(heap, item)
                else:
                    heapq.heapreplace(heap, item)

    def _write(self, engine: Engine) -> None:
        rows = [r for part in _gather(self.rows) for r in part]
        worst_parts = _gather({m: [item[2] for item in heap] for m, heap in self.worst.items()})
        summary = summarise(rows)
        engine.state.prompt_summary = summary
        rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        for s in summary:
            if s["modality"] == "all":
                self.logger.info(
                    f"{s['mode']}: Dice {s['dice_mean']:.4f} NSD {s['nsd_mean']:.4f} over {s['n_evaluated']} masks "
                    f"({s['n_empty']} empty masks counted, not scored)"
                )
        if self.output_dir is None or not rank0:
            return
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        fields = ["image", "mask_index", "modality", "mode", "status", "dice", "nsd", "gt_pixels", "pred_pixels"]
        _write_csv(out / "per_mask.csv", rows, fields)
        _write_csv(out / "summary.csv", summary, list(summary[0]) if summary else ["modality", "mode"])
        spacing_given = (
            bool(engine.state.output.get("spacing_given", False)) if isinstance(engine.state.output, dict) else False
        )
        payload = {
            "summary": summary,
            "n_rows": len(rows),
            "n_empty_masks": sum(s["n_empty"] for s in summary if s["modality"] == "all")
            // max(1, len({r["mode"] for r in rows})),
            "nsd_tolerance_mm": getattr(engine, "nsd_tolerance_mm", None),
            "spacing_from_data": spacing_given,
            "prompt_modes": getattr(engine, "prompt_modes", None),
        }
        _atomic_text(out / "summary.json", json.dumps(payload, indent=2, default=float))
        self._chart(summary, out / "dice_by_modality_mode.png")
        worst_dir = out / "worst"
        worst_dir.mkdir(exist_ok=True)
        merged: dict[str, list] = defaultdict(list)
        for part in worst_parts:
            for mode, items in part.items():
                merged[mode].extend(items)
        import matplotlib.pyplot as plt

        for mode, items in merged.items():
            items = sorted(items, key=lambda a: a[3]["dice"])[: self.worst_k]
            for rank, (grey, gt, pred, row, prompt) in enumerate(items):
                name = f"{Path(str(row['image'])).name} mask {row['mask_index']}"
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{mode}_{rank}_{name}")
                figure = overlay_figure(grey, gt, pred, overlay_title(name, mode, row), prompt)
                with atomic_write(worst_dir / f"{safe}.png") as tmp:
                    figure.savefig(tmp, dpi=100)
                plt.close(figure)

    @staticmethod
    def _chart(summary: list[dict], path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        modalities = sorted({s["modality"] for s in summary}, key=lambda m: (m == "all", m))
        modes = list(dict.fromkeys(s["mode"] for s in summary))
        values = {(s["modality"], s["mode"]): s["dice_mean"] for s in summary}
        fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(modalities) * max(1, len(modes)) / 3), 4))
        width = 0.8 / max(1, len(modes))
        for j, mode in enumerate(modes):
            heights = [0.0 if math.isnan(values.get((m, mode), math.nan)) else values[(m, mode)] for m in modalities]
            ax.bar(np.arange(len(modalities)) + j * width, heights, width, label=mode)
        ax.set_xticks(np.arange(len(modalities)) + width * (len(modes) - 1) / 2)
        ax.set_xticklabels(modalities)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean Dice")
        ax.set_title("Dice by modality and prompt mode")
        ax.legend(fontsize="small")
        fig.tight_layout()
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)


def _display_grey(image: torch.Tensor) -> np.ndarray:
    """A network input ``[3, S, S]`` (any pixel normalisation) as a uint8 grey picture (min-max of its channel mean)."""
    grey = image.detach().float().cpu().mean(0)
    low, high = float(grey.min()), float(grey.max())
    return ((grey - low) / max(high - low, 1e-8) * 255).clamp(0, 255).numpy().astype(np.uint8)


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _atomic_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def overlay_title(name: str, mode: str, row: dict) -> str:
    """The file name (wrapped), then the mode and its figures (and, for interactive modes, what is drawn)."""
    lines = textwrap.wrap(name, 44, break_on_hyphens=False) + [f"{mode}: Dice {row['dice']:.3f}, NSD {row['nsd']:.3f}"]
    kind, count = parse_mode(mode)
    if kind == "interactive":
        lines.append(f"(first prompt drawn; then {count} corrective clicks)")
    return "\n".join(lines)


def overlay_figure(grey: np.ndarray, gt: np.ndarray, pred: np.ndarray, title: str, prompt: dict | None = None):
    """A matplotlib figure of one mask: the network-frame image, ground truth (green), prediction (red) and the
    prompt (``{"boxes": [x0, y0, x1, y1]}`` in yellow; ``{"points": [[x, y], ...], "point_labels": [...]}``:
    foreground clicks as green +, background as red x, padding (-1) skipped); the title fits inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(4, 4.6))
    ax.imshow(grey, cmap="gray")
    if gt.any():
        ax.contour(gt.astype(float), levels=[0.5], colors="lime", linewidths=1)
    if pred.any():
        ax.contour(pred.astype(float), levels=[0.5], colors="red", linewidths=1)
    prompt = prompt or {}
    if prompt.get("boxes") is not None:
        x0, y0, x1, y1 = prompt["boxes"]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1))
    for (x, y), label in zip(prompt.get("points") or [], prompt.get("point_labels") or []):
        if label >= 0:
            ax.plot(x, y, marker="+" if label else "x", color="lime" if label else "red", markersize=8, mew=2)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    return fig
