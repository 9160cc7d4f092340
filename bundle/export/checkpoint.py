"""Load a checkpoint for export: the network its model contract names, every parameter from the file."""

from __future__ import annotations

import os

from bundle.networks import SAMUNet
from bundle.networks.contract import (
    CONTRACT_KEY,
    contract_arguments,
    contradictions,
    describe_architecture,
    network_arguments,
)
from bundle.networks.weights import WeightsFile, detect_format, load_state, read_weights


def describe(network: SAMUNet) -> str:
    """``backbone=tiny_vit, conv_branch=none, ...``: the architecture arguments of ``network``."""
    return ", ".join(f"{k}={v}" for k, v in network.config.items())


HINT = "export the checkpoint with the config it was trained with (or override network_def to match it)"


def load_for_export(network: SAMUNet, checkpoint: str | os.PathLike | dict, source: str | None = None) -> SAMUNet:
    """Load ``checkpoint`` (a file, a named weight such as ``"litemedsam"``, or a loaded checkpoint dict) into
    ``network``.

    Unlike training, where a partly loaded network is normal (a fresh conv branch), an exported model must be the
    trained one: a checkpoint with any parameter missing, unexpected or of another shape, or whose model contract
    names another network, raises ``ValueError`` naming the configuration and the keys, before anything is
    exported. Returns ``network`` in eval mode.
    """
    weights = _as_weights(checkpoint, source)
    try:
        report = load_state(network, weights)
    except ValueError as error:
        raise ValueError(
            f"{weights.name} does not match the network to export ({describe(network)}): {error}; {HINT}"
        ) from None
    if report.missing:
        raise ValueError(
            f"{weights.name} does not match the network to export ({describe(network)}): it "
            f"lacks {len(report.missing)} of its parameters, e.g. {report.missing[:6]}; {HINT}"
        )
    return network.eval()


def network_for(network: SAMUNet, checkpoint: dict) -> SAMUNet:
    """``network``, or the network a loaded checkpoint's model contract names when ``network`` was configured
    without those arguments (e.g. ``configs/inference.json``'s default). Raises ValueError naming both sides when
    an explicitly configured argument contradicts the contract."""
    contract = checkpoint.get(CONTRACT_KEY) if isinstance(checkpoint.get("model"), dict) else None
    if contract is None:
        return network
    wrong = contradictions(contract, network.explicit_args)
    if wrong:
        raise ValueError(
            f"the checkpoint holds a {describe_architecture(contract['architecture'])} network, but the config asks "
            f"for another: {'; '.join(wrong)}; {HINT}"
        )
    recorded = contract_arguments(contract)
    return network if recorded == network_arguments(network) else SAMUNet(**recorded)


def _as_weights(checkpoint: str | os.PathLike | dict, source: str | None) -> WeightsFile:
    if not isinstance(checkpoint, dict):
        return read_weights(checkpoint)
    from bundle.networks.contract import check_contract

    nested = isinstance(checkpoint.get("model"), dict)
    state = checkpoint["model"] if nested else checkpoint
    name = source or "the checkpoint"
    contract = check_contract(checkpoint[CONTRACT_KEY], name) if nested and CONTRACT_KEY in checkpoint else None
    return WeightsFile(name, state, contract, "bundle" if contract else detect_format(state), name)
