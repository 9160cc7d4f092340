"""One prompted forward pass with simulated interaction: encode once, decode the first prompt, then k corrective steps.

:class:`InteractiveDecoding` returns the low-res logits of every step (evaluation); :class:`InteractiveLoss` is the
training step's forward pass, which returns the loss averaged over the steps and can keep one decoder graph alive at
a time instead of k + 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from bundle.networks.interface import PromptableNetwork

from .prompts import corrective_clicks, deepest_clicks

__all__ = ["InteractiveDecoding", "InteractiveLoss"]


def _add_click(
    net, low, masks, image_index, points, point_labels, valid, generator=None, uniform=None, deepest_share=0.0
):
    """Append one corrective click per mask (from the error region of ``low``) to ``points`` / ``point_labels``.

    With ``uniform`` and ``deepest_share`` > 0, the masks whose number lies below ``deepest_share`` get the
    interactive protocol's click (:func:`deepest_clicks`), the others a uniform error pixel drawn with the rest of
    their number (rescaled to [0, 1))."""
    with torch.no_grad():
        pred = net.upsample_logits(low.detach().float()) > 0
        region = None if valid is None else valid[image_index]
        deepest = None
        if uniform is not None and deepest_share > 0:
            deepest = uniform < deepest_share
            uniform = ((uniform - deepest_share) / (1.0 - deepest_share)).clamp(0.0, 1.0 - 1e-7)
        click, click_label = corrective_clicks(pred, masks, generator=generator, valid=region, uniform=uniform)
        if deepest is not None and deepest.any():
            rows = deepest.nonzero()[:, 0].to(pred.device)
            xy, labels = deepest_clicks(pred[rows], masks[rows], None if region is None else region[rows])
            click[rows], click_label[rows] = xy, labels
    points = click if points is None else torch.cat([points, click], dim=1)
    point_labels = click_label if point_labels is None else torch.cat([point_labels, click_label], dim=1)
    return points, point_labels


class InteractiveDecoding(nn.Module):
    """Runs SAMUNet the SAM-Med2D way for one batch and returns the low-res logits of every step.

    ``forward`` encodes the images ONCE, decodes the initial prompt (boxes and/or points), then for each of
    ``iterations`` steps adds one corrective click per mask, sampled from the error region of the previous prediction
    (false negative -> foreground click, false positive -> background click), and feeds the previous low-res logits
    back as ``mask_inputs``, detached (as SAM-Med2D, whose corrective steps run the prompt encoder without a graph).
    Clicks accumulate across steps; an initial box is kept. ``features`` (from ``network.encode(image)``) skips the
    encoder, so an evaluator encodes once for every prompt mode.
    """

    def __init__(self, network: PromptableNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(
        self,
        image: torch.Tensor,
        masks: torch.Tensor,
        image_index: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        iterations: int = 0,
        valid: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        features: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        net = self.network
        if features is None:
            features = net.encode(image)
        low = net.decode_low_res(
            features, boxes=boxes, points=points, point_labels=point_labels, image_index=image_index
        )
        outputs = [low]
        for _ in range(iterations):
            points, point_labels = _add_click(net, low, masks, image_index, points, point_labels, valid, generator)
            low = net.decode_low_res(
                features,
                boxes=boxes,
                points=points,
                point_labels=point_labels,
                mask_inputs=low.detach().float(),
                image_index=image_index,
            )
            outputs.append(low)
        return outputs


class _PrecomputedGradients(torch.autograd.Function):
    """Returns ``value``; its backward hands ``grads[i] * grad_output / scale`` to ``inputs[i]``.

    Puts gradients that were already computed (step by step, with ``torch.autograd.grad``, of the loss times
    ``scale``) back into the caller's single backward pass, so the optimiser, a GradScaler and
    DistributedDataParallel see one ordinary graph.
    """

    @staticmethod
    def forward(ctx, value, grads, scale, *inputs):
        ctx.grads, ctx.scale = grads, scale
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        factor = grad_output / ctx.scale
        return (None, None, None, *(g * factor.to(g.dtype) for g in ctx.grads))


def _rows(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


class InteractiveLoss(nn.Module):
    """The training step's forward pass: SAM-Med2D's interactive loop (as :class:`InteractiveDecoding`) with the loss.

    Returns ``(loss, step_losses, logits)``: ``loss_function(upsampled logits, masks).mean()`` averaged over the
    ``iterations + 1`` steps (a scalar that back-propagates), the per-step losses ``[k + 1]`` and the last step's
    logits ``[N, 1, S, S]`` (both detached). Corrective clicks come from ``uniforms [iterations, N]`` (one number
    per step and mask, see :func:`corrective_clicks`), so a mask gets the same clicks whichever masks share its pass.

    Memory switches (none changes the gradients beyond float summation order):
        checkpoint_activations: the frozen encoder recomputes its activations in the backward pass
            (:meth:`SAMUNet.encode`).
        stepwise_backward: back-propagate each step's decoder graph as soon as its loss is known, with
            ``torch.autograd.grad`` into the decoder's weights and into detached copies of the image features, and
            free it; the summed feature gradients then reach the encoder side (conv branch, adapters, fusion path) in
            the caller's one backward pass. One decoder graph is alive at a time instead of ``k + 1``. Relies on the
            fed-back masks being detached, which they are.
        decoder_batch: with ``stepwise_backward``, decode at most this many masks at once (their k + 1 steps, then
            the next masks'; None: all). A mask's steps depend on nothing but the image features and its own
            predictions, so this only needs ``loss_function`` to be a mean over masks (DiceFocalLoss with
            ``batch=False``, the default, is).

    ``deepest_share``: the share of corrective clicks placed as the interactive protocol places them (the point
    deepest inside the largest error region) instead of SAM-Med2D's uniform error pixel (0: SAM-Med2D's recipe).

    ``grad_scale``: the fp16 GradScaler's current scale, applied inside the step-wise backward passes (they run
    before the caller's scaled backward) so small decoder gradients do not underflow in fp16. ``features`` (from
    ``network.encode``, e.g. cached for a frozen encoder) skip the encoder; ``image`` is then unused.
    """

    def __init__(
        self,
        network: PromptableNetwork,
        loss_function: Callable,
        checkpoint_activations: bool = False,
        stepwise_backward: bool = False,
        decoder_batch: int | None = None,
        deepest_share: float = 0.0,
    ) -> None:
        super().__init__()
        if decoder_batch is not None and decoder_batch < 1:
            raise ValueError(f"decoder_batch must be None or >= 1, got {decoder_batch}")
        if not 0.0 <= deepest_share < 1.0:
            raise ValueError(f"deepest_share must lie in [0, 1), got {deepest_share}")
        self.deepest_share = float(deepest_share)
        self.network = network
        self.loss_function = loss_function
        self.checkpoint_activations = bool(checkpoint_activations)
        self.stepwise_backward = bool(stepwise_backward)
        self.decoder_batch = decoder_batch

    def forward(
        self,
        image: torch.Tensor,
        masks: torch.Tensor,
        image_index: torch.Tensor,
        uniforms: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        grad_scale: float = 1.0,
        features: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if features is None:
            # only SAMUNet takes the switch; other runtimes of the protocol encode as they do
            encode_kwargs = {"checkpoint_activations": True} if self.checkpoint_activations else {}
            features = self.network.encode(image, **encode_kwargs)
        if not (self.stepwise_backward and torch.is_grad_enabled()):
            losses, logits = self._decode_steps(
                features, masks, image_index, uniforms, boxes, points, point_labels, valid
            )
            step_losses = torch.stack(losses)
            return step_losses.mean(), step_losses.detach(), logits.detach()

        names = [k for k, v in features.items() if v.requires_grad]
        leaves = {k: v.detach().requires_grad_(k in names) for k, v in features.items()}
        params = [p for p in self.network.parameters() if p.requires_grad]  # those the decoder does not use get None
        wrt = [leaves[k] for k in names] + params
        sums: list[torch.Tensor | None] = [None] * len(wrt)
        steps, n = uniforms.shape[0] + 1, masks.shape[0]
        step_losses, preds = 0.0, []
        for start in range(0, n, self.decoder_batch or n):
            rows = slice(start, start + (self.decoder_batch or n))
            share = masks[rows].shape[0] / n

            def backward(loss: torch.Tensor, share: float = share) -> None:
                grads = torch.autograd.grad(loss * (grad_scale * share / steps), wrt, allow_unused=True)
                for i, g in enumerate(grads):
                    if g is not None:
                        sums[i] = g if sums[i] is None else sums[i].add_(g)

            losses, logits = self._decode_steps(
                leaves,
                masks[rows],
                image_index[rows],
                uniforms[:, rows],
                _rows(boxes, rows),
                _rows(points, rows),
                _rows(point_labels, rows),
                valid,
                backward,
            )
            step_losses = step_losses + torch.stack(losses) * share
            preds.append(logits)
        # the graph the caller back-propagates: features -> encoder side, and the decoder weights directly
        targets = [features[k] for k in names] + params
        used = [(t, s) for t, s in zip(targets, sums) if s is not None]
        total = _PrecomputedGradients.apply(
            step_losses.mean(), tuple(s for _, s in used), grad_scale, *(t for t, _ in used)
        )
        return total, step_losses, torch.cat(preds)

    def _decode_steps(self, features, masks, image_index, uniforms, boxes, points, point_labels, valid, backward=None):
        """The k + 1 decoding steps of some masks: ``(per-step losses, last logits)``; ``backward(loss)`` after each
        step's loss (the loss is then kept detached)."""
        net = self.network
        losses, low = [], None
        for step in range(uniforms.shape[0] + 1):
            if step:
                points, point_labels = _add_click(
                    net,
                    low,
                    masks,
                    image_index,
                    points,
                    point_labels,
                    valid,
                    uniform=uniforms[step - 1],
                    deepest_share=self.deepest_share,
                )
            low = net.decode_low_res(
                features,
                boxes=boxes,
                points=points,
                point_labels=point_labels,
                mask_inputs=None if low is None else low.detach().float(),
                image_index=image_index,
            )
            logits = net.upsample_logits(low.float())
            loss = self.loss_function(logits, masks).mean()
            if backward is not None:
                backward(loss)
                loss = loss.detach()
            losses.append(loss)
        return losses, logits.detach()
