"""Load a checkpoint for export: every parameter of the configured network must come from the file."""

from __future__ import annotations

import os

import torch

from bundle.networks import SAMUNet
from bundle.networks.weights import convert_state_dict, read_state_dict, resolve_weights


def describe(network: SAMUNet) -> str:
    """``backbone=tiny_vit, conv_branch=none, ...``: the architecture arguments of ``network``."""
    return ", ".join(f"{k}={v}" for k, v in network.config.items())


def load_for_export(network: SAMUNet, checkpoint: str | os.PathLike | dict, source: str | None = None) -> SAMUNet:
    """Load ``checkpoint`` (a file, a named weight such as ``"litemedsam"``, or a state dict) into ``network``.

    Unlike training, where a partly loaded network is normal (a fresh conv branch), an exported model must be the
    trained one: a checkpoint with any parameter missing, unexpected or of another shape raises ``ValueError``
    naming the configuration and the keys, before anything is exported. Returns ``network`` in eval mode.
    """
    if isinstance(checkpoint, dict):
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint.get("model"), dict) else checkpoint
        source = source or "the checkpoint"
    else:
        path = resolve_weights(checkpoint)
        state = read_state_dict(path)
        source = source or str(path)
    hint = "export the checkpoint with the config it was trained with (or override network_def to match it)"
    try:
        mapped, report = convert_state_dict(network, state, "auto")
    except ValueError as error:
        raise ValueError(
            f"{source} does not match the network to export ({describe(network)}): {error}; {hint}"
        ) from None
    if report.missing:
        raise ValueError(
            f"{source} does not match the network to export ({describe(network)}): it lacks {len(report.missing)} of "
            f"its parameters, e.g. {report.missing[:6]}; {hint}"
        )
    network.load_state_dict(mapped, strict=True)
    return network.eval()


def state_fingerprint(network: torch.nn.Module) -> str:
    """A short hash of the network's weights: encoder and decoder files exported together carry the same one."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
