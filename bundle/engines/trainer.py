"""SupervisedTrainer subclass that simulates prompts (box, points, SAM-Med2D corrective clicks) from the labels."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from bundle.data.resumable import ResumableSampler
from bundle.networks.interface import PromptableNetwork, unwrap

from .interactive import InteractiveLoss
from .prompts import initial_prompts, valid_region

__all__ = ["SAMUNetTrainer", "TrainingOutOfMemoryError", "flatten_masks"]

GIB = 2**30

logger = logging.getLogger(__name__)


def flatten_masks(
    batch: Mapping, image_key: str, label_key: str, device, non_blocking: bool = False, valid_key: str | None = None
):
    """Batch -> ``image [B, 3, S, S]``, ``masks [B*M, 1, S, S]`` (float 0/1), ``image_index [B*M]``, ``valid [B, S, S]``.

    ``batch[label_key]`` is ``[B, M, S, S]``: M instance masks per image (M = 1 for one mask per item). All-zero
    channels are kept here; callers decide (training drops them, evaluation counts them).
    """
    if image_key not in batch or label_key not in batch:
        raise KeyError(f"batch must hold {image_key!r} and {label_key!r}, got keys {sorted(batch)}")
    image = torch.as_tensor(batch[image_key]).to(device, non_blocking=non_blocking).float()
    label = torch.as_tensor(batch[label_key]).to(device, non_blocking=non_blocking)
    if label.ndim == 3:
        label = label[:, None]
    if label.ndim != 4 or label.shape[0] != image.shape[0] or label.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"{label_key!r} must be [B, M, H, W] masks matching {image_key!r} {tuple(image.shape)}, got {tuple(label.shape)}"
        )
    b, m = label.shape[:2]
    masks = (label.reshape(b * m, 1, *label.shape[2:]) > 0.5).float()
    image_index = torch.arange(b, device=device).repeat_interleave(m)
    sizes = batch.get(valid_key) if valid_key else None  # absent key: the whole frame is image content
    valid = valid_region(sizes, b, tuple(image.shape[2:]), device)
    return image, masks, image_index, valid


class TrainingOutOfMemoryError(torch.OutOfMemoryError):
    """CUDA ran out of memory in a training step; the message gives the measured memory per image and what fits."""


class _CudaMemory:
    """The device-memory figures the out-of-memory report reads (``torch.cuda``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def free(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


class SAMUNetTrainer(SupervisedTrainer):
    """Trains SAMUNet with prompts sampled from the labels at every iteration.

    Per iteration: every image of the batch is encoded once; every non-empty instance mask gets a prompt (a box from
    its largest connected component with jittered corners, or ``num_points`` points, chosen per iteration with
    ``prompt_probs``); then ``interactive_iterations`` SAM-Med2D corrective steps follow, each adding one click from the
    error region and feeding the previous low-res logits back (detached, as SAM-Med2D). The loss (``loss_function`` on
    the upsampled logits, e.g. focal + 20 x Dice) is averaged over the steps; one optimiser step per iteration.
    ``engine.state.output`` is a one-item list ``[{"image", "label", "pred", "loss", "step_losses", "prompt_mode",
    "num_masks"}]`` (like a decollated batch), so ``from_engine(["loss"], first=True)`` reads the loss.

    All other arguments are :class:`monai.engines.SupervisedTrainer`'s (``inferer`` is unused by the prompt loop but
    kept for MONAI's TrainProperties; ``optim_set_to_none`` frees the gradients between iterations; ``amp`` runs the
    step under ``torch.autocast("cuda", **amp_kwargs)`` on CUDA, with MONAI's GradScaler only for float16). Under
    ``torch.distributed`` (world size > 1) the step runs through DistributedDataParallel (wrapping the prompt loop, so
    ``network`` stays a plain SAMUNet for checkpoints); at the end of the run rank 0's buffers (BatchNorm statistics)
    are broadcast so every rank ends with identical weights.

    Args:
        prompt_probs: probability of each initial prompt mode, ``{"box": p, "points": q}``.
        num_points: points in a "points" initial prompt (1 in SAM-Med2D training).
        interactive_iterations: corrective steps after the initial prompt (8 in SAM-Med2D, 0 = reference SAM-UNet).
        box_jitter: maximum corner shift in pixels (the reference: min(5, half the box's short side)).
        max_masks_per_image: random subset of non-empty masks per image (None: all).
        prompt_seed: seed of the prompt samplers, which are reseeded from (seed, rank, iteration) at every iteration;
            None draws one from torch's global generator (so ``monai.utils.set_determinism`` makes runs repeatable).
            The seed is part of the trainer's ``state_dict``, as is a :class:`~bundle.data.ResumableSampler`'s, and
            such a sampler is moved to the run's place in its data when the run starts: a resumed run draws the
            prompts and sees the batches the uninterrupted run did.
        image_key, label_key: batch keys; ``label`` is ``[B, M, S, S]`` instance masks in the network frame.
        valid_size_key: batch key with each image's original (height, width) (`ToNetworkFramed` stores
            ``original_hw``); corrective clicks stay off the bottom/right padding. Missing key: the whole frame.
        find_unused_parameters: passed to DistributedDataParallel (a box-only step leaves point embeddings unused).
        accumulate_steps: split every batch into this many micro-batches of whole images, each forward and backward
            on its own, gradients summed (weighted by masks, so the loss is the batch's mean) before the one optimiser
            step: the effective batch stays ``batch_size`` while memory scales with ``batch_size / accumulate_steps``
            images. Only the conv branch's BatchNorm statistics are computed per micro-batch. (MONAI's own
            ``accumulation_steps`` accumulates over iterations instead, which would change what an iteration,
            ``epoch_length`` and ``checkpoint_interval`` count, and weights batches equally whatever their mask count.)
        checkpoint_activations, stepwise_backward, decoder_batch: memory switches of :class:`InteractiveLoss` (same
            gradients).
        channels_last: run the step in channels-last memory format (network weights and input images).

    On CUDA out-of-memory the trainer measures one image's step and raises :class:`TrainingOutOfMemoryError` naming
    the memory per image and the largest micro-batch that fits (and the ``accumulate_steps`` that gives it).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: PromptableNetwork,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        prompt_probs: Mapping[str, float] | None = None,
        num_points: int = 1,
        interactive_iterations: int = 8,
        box_jitter: int = 5,
        max_masks_per_image: int | None = None,
        prompt_seed: int | None = None,
        image_key: str = "image",
        label_key: str = "label",
        valid_size_key: str | None = "original_hw",
        find_unused_parameters: bool = True,
        accumulate_steps: int = 1,
        checkpoint_activations: bool = True,
        stepwise_backward: bool = True,
        decoder_batch: int | None = 1,
        channels_last: bool = False,
        decollate: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError(
                "SAMUNetTrainer accumulates gradients within an iteration: set accumulate_steps, not accumulation_steps"
            )
        if int(accumulate_steps) != accumulate_steps or accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be a whole number >= 1, got {accumulate_steps!r}")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            decollate=decollate,
            **kwargs,
        )
        probs = dict(prompt_probs or {"box": 0.5, "points": 0.5})
        unknown = set(probs) - {"box", "points"}
        if unknown or not probs or sum(probs.values()) <= 0 or min(probs.values()) < 0:
            raise ValueError(f"prompt_probs must give non-negative weights to 'box' and/or 'points', got {probs}")
        if interactive_iterations < 0 or num_points < 1:
            raise ValueError(
                f"need interactive_iterations >= 0 and num_points >= 1, got {interactive_iterations}, {num_points}"
            )
        self.prompt_modes = list(probs)
        self.prompt_weights = torch.tensor([float(probs[k]) for k in self.prompt_modes])
        self.num_points = int(num_points)
        self.interactive_iterations = int(interactive_iterations)
        self.box_jitter = int(box_jitter)
        self.max_masks_per_image = max_masks_per_image
        self.accumulate_steps = int(accumulate_steps)
        self.channels_last = bool(channels_last)
        self.image_key, self.label_key, self.valid_size_key = image_key, label_key, valid_size_key
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank = dist.get_rank() if self.distributed else 0
        self.rank = rank
        self.prompt_seed = int(torch.randint(0, 2**31 - 1, ())) if prompt_seed is None else int(prompt_seed)
        self.rng = np.random.RandomState(self.prompt_seed + rank)
        self.generator = torch.Generator().manual_seed(self.prompt_seed + rank)
        self._seek_data = False
        self.add_event_handler(Events.STARTED, self._plan_data_seek)
        self.add_event_handler(Events.EPOCH_STARTED, self._seek_sampler)
        if self.channels_last:
            unwrap(network).to(memory_format=torch.channels_last)
        step = InteractiveLoss(unwrap(network), loss_function, checkpoint_activations, stepwise_backward, decoder_batch)
        if self.distributed:
            dev = torch.device(device)
            step = torch.nn.parallel.DistributedDataParallel(
                step,
                device_ids=[dev] if dev.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
            self.add_event_handler(Events.COMPLETED, self._sync_buffers)
        self.step_module = step
        self.memory = _CudaMemory(torch.device(device)) if torch.device(device).type == "cuda" else None
        self.empty_masks_skipped = 0

    # ------------------------------------------------------------------------------------------------------ resuming
    def _sampler(self) -> ResumableSampler | None:
        sampler = getattr(self.data_loader, "sampler", None)
        return sampler if isinstance(sampler, ResumableSampler) else None

    def state_dict(self) -> OrderedDict:
        """ignite's state (iteration, epoch length, max epochs) with the prompt and data seeds."""
        state = super().state_dict()
        state["prompt_seed"] = self.prompt_seed
        if (sampler := self._sampler()) is not None:
            state["data_seed"] = sampler.seed
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        """ignite's ``load_state_dict``; restores the seeds when the checkpoint has them (older ones do not)."""
        state_dict = dict(state_dict)
        prompt_seed, data_seed = state_dict.pop("prompt_seed", None), state_dict.pop("data_seed", None)
        super().load_state_dict(state_dict)
        if prompt_seed is not None:
            self.prompt_seed = int(prompt_seed)
        if data_seed is not None and (sampler := self._sampler()) is not None:
            sampler.seed = int(data_seed)

    def _plan_data_seek(self, _engine=None) -> None:
        self._seek_data = True

    def _seek_sampler(self, _engine=None) -> None:
        """At a run's first epoch start (after the checkpoint loader's STARTED): the sampler to the run's place."""
        if self._seek_data and (sampler := self._sampler()) is not None:
            sampler.seek(self.state.iteration, self.data_loader.batch_size, self.data_loader.drop_last)
        self._seek_data = False

    def _reseed_prompts(self, iteration: int) -> None:
        seeds = np.random.SeedSequence([self.prompt_seed, self.rank, iteration]).generate_state(2)
        self.rng.seed(int(seeds[0]))
        self.generator.manual_seed(int(seeds[1]))

    # ---------------------------------------------------------------------------------------------------- iteration
    def _choose_masks(self, masks: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Indices of the non-empty masks to train on (a random subset per image when max_masks_per_image is set)."""
        nonempty = masks.flatten(1).any(dim=1)
        self.empty_masks_skipped += int((~nonempty).sum())
        keep = torch.nonzero(nonempty).flatten()
        if self.max_masks_per_image and keep.numel():
            chosen = []
            for img in image_index[keep].unique():
                own = keep[image_index[keep] == img]
                order = torch.randperm(own.numel(), generator=self.generator)[: self.max_masks_per_image]
                chosen.append(own[order.to(own.device)])
            keep = torch.cat(chosen)
        return keep

    def _initial_prompt(self, masks: torch.Tensor) -> tuple[str, dict]:
        mode = self.prompt_modes[int(torch.multinomial(self.prompt_weights, 1, generator=self.generator))]
        return mode, initial_prompts(masks, mode, self.rng, num_points=self.num_points, jitter=self.box_jitter)

    def _micro_batches(self, image_index: torch.Tensor, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Split the images that have masks into ``steps`` groups: ``[(image ids, mask ids)]``, masks in order."""
        images = image_index.unique()
        groups = torch.tensor_split(images, min(steps, images.numel()))
        return [(group, torch.nonzero(torch.isin(image_index, group)).flatten()) for group in groups]

    def _iteration(self, engine: SAMUNetTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        self._reseed_prompts(engine.state.iteration)
        image, masks, image_index, valid = flatten_masks(
            batchdata, self.image_key, self.label_key, engine.state.device, engine.non_blocking, self.valid_size_key
        )
        keep = self._choose_masks(masks, image_index)
        weight = 1.0
        if keep.numel() == 0:
            # no object in this batch: run a zero-weighted step so every DDP rank still takes part in the reduction
            keep, weight = torch.zeros(1, dtype=torch.long, device=masks.device), 0.0
        masks, image_index = masks[keep], image_index[keep]
        size = image.shape[-1]
        if weight == 0.0:
            mode, prompt = "box", {"boxes": torch.tensor([[0.0, 0.0, size - 1.0, size - 1.0]], device=masks.device)}
        else:
            mode, prompt = self._initial_prompt(masks)
        # one number per corrective step and mask picks its click, whichever micro-batch the mask falls in
        uniforms = torch.rand(self.interactive_iterations, masks.shape[0], generator=self.generator).to(masks.device)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)

        engine.state.output = {
            Keys.IMAGE: image,
            Keys.LABEL: masks,
            "prompt_mode": mode,
            "num_masks": int(weight and keep.numel()),
        }
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        chunks = self._micro_batches(image_index, self.accumulate_steps)
        scaler = self._grad_scaler(engine)
        failed = None
        try:
            self._forward_backward(engine, image, masks, image_index, valid, prompt, uniforms, weight, chunks, scaler)
        except torch.OutOfMemoryError as error:
            if self.memory is None or isinstance(error, TrainingOutOfMemoryError):
                raise
            failed = str(error).splitlines()[0]
        if failed is not None:  # outside the except block, so the failed step's tensors can be freed
            self._report_out_of_memory(engine, image, masks, image_index, valid, prompt, uniforms, chunks, failed)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if scaler is not None:
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        # one "decollated" item holding the whole batch: MONAI's handlers (StatsHandler, MLFlowHandler from
        # ``--tracking mlflow``) read the loss with ``from_engine(["loss"], first=True)`` from such a list
        return [engine.state.output]

    @staticmethod
    def _grad_scaler(engine):
        """MONAI's GradScaler when the step runs under float16 autocast (bfloat16 needs none)."""
        if not engine.amp or engine.state.device.type != "cuda":
            return None
        return engine.scaler if engine.amp_kwargs.get("dtype", torch.float16) == torch.float16 else None

    def _forward_backward(self, engine, image, masks, image_index, valid, prompt, uniforms, weight, chunks, scaler):
        """Forward and backward of every micro-batch; fills ``loss``, ``step_losses`` and ``pred`` of the output."""
        autocast = engine.amp and image.is_cuda
        grad_scale = float(scaler.get_scale()) if scaler is not None else 1.0
        loss_sum, step_loss_sum, preds = 0.0, 0.0, []
        for n, (images, chosen) in enumerate(chunks):
            share = weight * chosen.numel() / masks.shape[0]  # the batch loss is the mean over all masks
            # DDP reduces the gradients once, in the last micro-batch's backward
            last = n == len(chunks) - 1
            sync = self.step_module.no_sync() if self.distributed and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast("cuda", **engine.amp_kwargs) if autocast else contextlib.nullcontext():
                    loss, step_losses, pred = self.step_module(
                        image[images],
                        masks[chosen],
                        torch.searchsorted(images, image_index[chosen]),
                        uniforms[:, chosen],
                        valid=valid[images],
                        grad_scale=grad_scale,
                        **{k: v[chosen] for k, v in prompt.items()},
                    )
                share_loss = loss * share
                (scaler.scale(share_loss) if scaler is not None else share_loss).backward()
            loss_sum = loss_sum + share_loss.detach()
            step_loss_sum = step_loss_sum + step_losses * share
            preds.append(pred)
        engine.state.output[Keys.PRED] = torch.cat(preds)
        engine.state.output["step_losses"] = step_loss_sum
        engine.state.output[Keys.LOSS] = loss_sum

    def _report_out_of_memory(
        self, engine, image, masks, image_index, valid, prompt, uniforms, chunks, failed
    ) -> NoReturn:
        """Measure one image's training step and raise :class:`TrainingOutOfMemoryError` saying what fits."""
        memory = self.memory
        engine.optimizer.zero_grad(set_to_none=True)
        engine.state.output.pop(Keys.PRED, None)
        memory.release()
        free, held = memory.free(), memory.allocated()
        first = chunks[0][0][:1]
        probe = [(first, torch.nonzero(image_index == first).flatten())]
        memory.reset_peak()
        try:
            self._forward_backward(
                engine, image, masks, image_index, valid, prompt, uniforms, 1.0, probe, self._grad_scaler(engine)
            )
            per_image = memory.peak() - held
        except torch.OutOfMemoryError:
            per_image = None
        engine.optimizer.zero_grad(set_to_none=True)
        engine.state.output.pop(Keys.PRED, None)
        memory.release()
        batch, largest = len(image_index.unique()), max(chunk[0].numel() for chunk in chunks)
        masks_per_image = masks.shape[0] / max(batch, 1)
        where = (
            f"CUDA out of memory in a training step of {largest} image(s) at once (batch of {batch} images, "
            f"{masks_per_image:.3g} masks each, {self.interactive_iterations} corrective steps, accumulate_steps "
            f"{self.accumulate_steps}) on {memory.device}: {failed}"
        )
        if per_image is None:
            message = (
                f"{where}. Even one image does not fit in the {free / GIB:.2f} GiB left beside the "
                f"{held / GIB:.2f} GiB of weights and optimiser state: lower masks_per_image or "
                "interactive_iterations, or use a larger device."
            )
        else:
            # the free memory measured after clean-up is optimistic: the step did run out at `largest` images
            fits = min(int(free // max(per_image, 1)), largest - 1)
            if fits:
                steps = math.ceil(batch / fits)
                advice = (
                    f"set accumulate_steps to {steps} (micro-batches of {math.ceil(batch / steps)} images, the same "
                    f"effective batch of {batch}) or lower batch_size"
                )
            else:
                advice = "lower masks_per_image or interactive_iterations, or use a larger device"
            message = (
                f"{where}. Measured: one image takes {per_image / GIB:.2f} GiB beside {held / GIB:.2f} GiB of "
                f"weights and optimiser state; {free / GIB:.2f} GiB are free, so at most {fits} image(s) fit in "
                f"one micro-batch: {advice}."
            )
        logger.error(message)
        raise TrainingOutOfMemoryError(message)

    def _sync_buffers(self, engine) -> None:
        """Broadcast rank 0's buffers (BatchNorm running statistics) so all ranks end with identical state dicts."""
        for buffer in unwrap(self.network).buffers():
            dist.broadcast(buffer.data, src=0)
