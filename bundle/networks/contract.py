"""The model contract: what a bundle checkpoint says about the network it belongs to.

A bundle checkpoint is ``{"model": state_dict, "network": contract}`` where the contract is::

    {"architecture": {"backbone", "image_size", "conv_branch", "fusion", "decoder_tokens"},  # SAMUNet arguments
     "pixel_normalization": "sam" | "litemedsam", "image_size": 256,
     "fingerprint": <16 hex digits of SHA-256 over the state dict>, "bundle_version": "0.3.0", "contract_version": 1}

An optional ``"trained_prompts"`` (e.g. ``["box", "points", "mask"]``) says what the weights were trained to follow
(``"mask"``: the previous low-res logits fed back with each corrective click); the slice inferer's
``mask_feedback="auto"`` reads it (:func:`bundle.networks.weights.trained_prompts`). An optional ``"base_weights"``
(a named checkpoint, ``"litemedsam"``) says the file holds part of the network only (a fine-tuned decoder), to be
loaded on top of those weights (:class:`bundle.networks.SAMUNet`).

Every saver writes it (the training checkpoint handlers, the MONAI Label train task, federated sites through the
training config) and every loader builds the network from it (:class:`bundle.networks.SAMUNet` with ``weights``), so a
trained model runs everywhere without architecture overrides. Checkpoints without the entry (official SAM,
LiteMedSAM, reference SAM-UNet, older bundle files) still load: their architecture is read from their keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CONTRACT_KEY = "network"
CONTRACT_VERSION = 1
ARCHITECTURE_ARGS = ("backbone", "image_size", "conv_branch", "fusion", "decoder_tokens")
#: the paper's network: SAM ViT-B at 256, ResNet34 branch, multi-scale fusion, one med token
PAPER_ARCHITECTURE = {
    "backbone": "vit_b",
    "image_size": 256,
    "conv_branch": "resnet34",
    "fusion": True,
    "decoder_tokens": "med",
}
#: LiteMedSAM as a configuration: TinyViT, no conv branch, no fusion, SAM's output tokens
LITEMEDSAM_ARCHITECTURE = {"backbone": "tiny_vit", "conv_branch": "none", "fusion": False, "decoder_tokens": "sam"}
_VIT_WIDTHS = {768: "vit_b", 96: "vit_tiny"}


def bundle_version() -> str:
    """The bundle's version: ``configs/metadata.json`` beside the package, else the installed package's."""
    metadata = Path(__file__).resolve().parents[2] / "configs" / "metadata.json"
    try:
        return str(json.loads(metadata.read_text())["version"])
    except (OSError, ValueError, KeyError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("sam-unet-bundle")
        except PackageNotFoundError:
            return "unknown"


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """16 hex digits of SHA-256 over the names, shapes, dtypes and values of a state dict (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def describe_architecture(architecture: dict) -> str:
    """``tiny_vit + resnet34 branch, fusion, sam tokens, 256 px`` (what a log line or an error shows)."""
    a = {**PAPER_ARCHITECTURE, **architecture}
    branch = "no conv branch" if a["conv_branch"] == "none" else f"{a['conv_branch']} branch"
    fusion = "fusion" if a["fusion"] else "no fusion"
    return f"{a['backbone']} + {branch}, {fusion}, {a['decoder_tokens']} tokens, {a['image_size']} px"


def make_contract(network: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict:
    """The contract of ``network`` (a SAMUNet) for its current weights (or ``state``)."""
    state = network.state_dict() if state is None else state
    return {
        "architecture": dict(network.config),
        "pixel_normalization": network.pixel_normalization,
        "image_size": int(network.image_size),
        "fingerprint": weights_fingerprint(state),
        "bundle_version": bundle_version(),
        "contract_version": CONTRACT_VERSION,
    }


def check_contract(contract, source: str) -> dict:
    """Validate a contract read from ``source``; returns it, or raises ValueError naming the file and the field."""
    if not isinstance(contract, dict) or not isinstance(contract.get("architecture"), dict):
        raise ValueError(f"{source}: its '{CONTRACT_KEY}' entry is not a bundle model contract (got {contract!r:.80})")
    missing = [k for k in ARCHITECTURE_ARGS if k not in contract["architecture"]]
    if missing or "pixel_normalization" not in contract:
        raise ValueError(
            f"{source}: the model contract lacks {missing + (['pixel_normalization'] * ('pixel_normalization' not in contract))}"
        )
    return contract


def contradictions(contract: dict, explicit: dict) -> list[str]:
    """``name: checkpoint X, config Y`` for every explicitly configured argument the contract disagrees with."""
    recorded = contract_arguments(contract)
    return [
        f"{name}: checkpoint {recorded[name]!r}, config {value!r}"
        for name, value in explicit.items()
        if name in recorded and recorded[name] != value
    ]


def infer_architecture(state: dict[str, torch.Tensor], source_format: str) -> dict:
    """The SAMUNet arguments a contract-less checkpoint implies, from its format and key names (partial: what the
    keys tell)."""
    from .weights import SAM_ONLY_HEADS

    if source_format == "litemedsam":
        return dict(LITEMEDSAM_ARCHITECTURE)
    if source_format == "sam":
        return {"backbone": "vit_b", "conv_branch": "none", "fusion": False, "decoder_tokens": "sam"}
    if source_format == "torchvision_resnet":
        return {}
    keys = set(state)
    if source_format == "sam_unet_reference":
        bottleneck = "resnet.stage1.0.conv3.weight" in keys
        return {
            "backbone": "vit_b",
            "conv_branch": "resnet50" if bottleneck else "resnet34",
            "fusion": True,
            "decoder_tokens": "med",
        }
    architecture: dict = {}
    if any(k.startswith("image_encoder.layers.") for k in keys):
        architecture["backbone"] = "tiny_vit"
    elif "image_encoder.blocks.0.attn.qkv.weight" in state:
        width = int(state["image_encoder.blocks.0.attn.qkv.weight"].shape[1])
        if width in _VIT_WIDTHS:
            architecture["backbone"] = _VIT_WIDTHS[width]
        if "image_encoder.pos_embed" in state:
            architecture["image_size"] = int(state["image_encoder.pos_embed"].shape[1]) * 16
    if any(k.startswith("image_encoder.") for k in keys):
        if "conv_branch.conv1.weight" not in state:
            architecture["conv_branch"] = "none"
        elif "conv_branch.layer1.0.conv3.weight" in state:
            architecture["conv_branch"] = "resnet50"
        else:
            blocks = {k.split(".")[2] for k in keys if k.startswith("conv_branch.layer3.")}
            architecture["conv_branch"] = "resnet34" if len(blocks) == 6 else "resnet18"
        architecture["fusion"] = any(k.startswith("embedding_encoder.") for k in keys)
        if "mask_decoder.med_token.weight" in state:
            architecture["decoder_tokens"] = "med"
        elif "mask_decoder.iou_token.weight" in state or any(k.startswith(SAM_ONLY_HEADS) for k in keys):
            architecture["decoder_tokens"] = "sam"
    return architecture


def network_arguments(network: torch.nn.Module) -> dict:
    """What builds ``network`` again: its architecture arguments and its pixel normalisation."""
    return {**network.config, "pixel_normalization": network.pixel_normalization}


def contract_arguments(contract: dict) -> dict:
    """What builds the network a contract describes: its architecture arguments and pixel normalisation."""
    return {**contract["architecture"], "pixel_normalization": contract["pixel_normalization"]}


def config_overrides(arguments: dict) -> dict:
    """The bundle config ids (``network_def#<argument>`` and the pixel normalisation id) that build the network
    ``arguments`` (:func:`network_arguments`) describe."""
    ids = {f"network_def#{k}": arguments[k] for k in ARCHITECTURE_ARGS}
    return {**ids, "pixel_normalization": arguments["pixel_normalization"]}


def explicit_arguments(overrides: dict) -> dict:
    """The SAMUNet arguments (and pixel normalisation) that config ``overrides`` set explicitly: the inverse of
    :func:`config_overrides` for the ids present."""
    explicit = {k: overrides.get(f"network_def#{k}") for k in ARCHITECTURE_ARGS}
    explicit["pixel_normalization"] = overrides.get("pixel_normalization")
    return {k: v for k, v in explicit.items() if v is not None}


class ContractEntry:
    """The model contract as an entry of an ignite / MONAI checkpoint ``save_dict`` (``{"network": ContractEntry(net)}``).

    ``state_dict()`` is the contract of the network's current weights; ``load_state_dict(contract)`` (on resume)
    checks that the checkpoint belongs to this network and raises ValueError naming both otherwise.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def _network(self) -> torch.nn.Module:
        from .interface import unwrap

        return unwrap(self.network)

    def state_dict(self) -> dict:
        return make_contract(self._network())

    def load_state_dict(self, contract: dict, strict: bool = True) -> None:
        network = self._network()
        contract = check_contract(contract, "checkpoint")
        wrong = contradictions(contract, network_arguments(network))
        if wrong:
            raise ValueError(
                f"the checkpoint belongs to another network ({describe_architecture(contract['architecture'])}) than "
                f"the configured one ({describe_architecture(network.config)}): {'; '.join(wrong)}"
            )
