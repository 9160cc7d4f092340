"""Activation checkpointing for the frozen encoder stages that the training gradient passes through."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def recomputed(block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``block(x)``; with ``enabled``, and only when a gradient will flow back through ``x``, through
    ``torch.utils.checkpoint`` (non-reentrant): the block's activations are dropped after the forward pass and
    recomputed during the backward pass. Frozen weights, eval-mode norms and no dropout make the recomputation
    bit-identical, so the gradients do not change."""
    if enabled and torch.is_grad_enabled() and x.requires_grad:
        return checkpoint(block, x, use_reentrant=False)
    return block(x)
