"""TorchScript export through MONAI's ``ckpt_export``: a traced encoder and decoder in a scripted shell.

``python -m monai.bundle ckpt_export export_network --config_file configs/inference.json --ckpt_file models/model.pt
--filepath models/model.ts`` loads the checkpoint into :class:`TorchScriptExport` (strictly, with a clear error on a
mismatch) and calls ``torch.jit.script`` on it, which first calls :meth:`TorchScriptExport.__prepare_scriptable__`:
that traces the two halves (exact, see ``tests/test_export.py``; scripting SAM's and TinyViT's modules is not
possible) and returns a :class:`ScriptedSAMUNet` whose methods are compiled by ``torch.jit.script``.

The saved module needs only ``torch`` to run::

    model = torch.jit.load("models/model.ts")
    logits = model(image, boxes)                      # [B, 1, S, S] logits for one box per image
    embedding, multi_scale = model.encode(image)      # cache these per slice ...
    low_res = model.decode(embedding, multi_scale, point_coords, point_labels, mask_input, has_mask_input)

Prompts follow :mod:`bundle.export.modules` (SAM's ONNX convention). ``multi_scale`` is an empty tensor for networks
without the fusion path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bundle.networks import SAMUNet

from .checkpoint import load_for_export, network_for
from .modules import ImageEncoderExport, PromptDecoderExport, pack_prompts


class _TwoFeatureEncoder(nn.Module):
    """The encoder with a fixed output arity: ``(embedding, multi_scale or an empty tensor)``."""

    def __init__(self, network: SAMUNet) -> None:
        super().__init__()
        self.encoder = ImageEncoderExport(network)
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(image)
        return features[0], features[1] if len(features) > 1 else features[0].new_zeros(0)


class _TwoFeatureDecoder(nn.Module):
    """The decoder with a fixed input arity; ``multi_scale`` is ignored without the fusion path."""

    def __init__(self, network: SAMUNet) -> None:
        super().__init__()
        self.decoder = PromptDecoderExport(network)
        self.eval()

    def forward(self, embedding, multi_scale, point_coords, point_labels, mask_input, has_mask_input):
        features = (embedding, multi_scale) if self.decoder.n_features > 1 else (embedding,)
        return self.decoder(*features, point_coords, point_labels, mask_input, has_mask_input)


class ScriptedSAMUNet(nn.Module):
    """Scripted shell around the traced encoder and decoder (see the module docstring for its methods)."""

    def __init__(
        self, encoder: torch.jit.ScriptModule, decoder: torch.jit.ScriptModule, image_size: int, mask_input_size: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.image_size = image_size
        self.mask_input_size = mask_input_size

    @torch.jit.export
    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(image)

    @torch.jit.export
    def decode(
        self,
        embedding: torch.Tensor,
        multi_scale: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> torch.Tensor:
        return self.decoder(embedding, multi_scale, point_coords, point_labels, mask_input, has_mask_input)

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        embedding, multi_scale = self.encoder(image)
        n = boxes.shape[0]
        coords = boxes.reshape(n, 2, 2)
        labels = torch.tensor([2.0, 3.0], device=boxes.device).expand(n, 2)
        mask = torch.zeros(n, 1, self.mask_input_size, self.mask_input_size, device=boxes.device)
        low_res = self.decoder(embedding, multi_scale, coords, labels, mask, torch.zeros(1, device=boxes.device))
        return F.interpolate(low_res, size=[self.image_size, self.image_size], mode="bilinear", align_corners=False)


def _trace(module: nn.Module, example: tuple, eager) -> torch.jit.ScriptModule:
    """``module`` traced on ``example`` and checked against its eager output ``eager`` (a tensor or a tuple).

    ``torch.jit.trace``'s own check is off: it traces the module a second time and compares the two graphs and their
    outputs, which took 33 of the 49 s of a SAM-UNet-Lite export on 2 CPU cores. One run of the traced module,
    compared here, catches a trace that does not compute what the network does; shapes that tracing could freeze
    are checked by running the export on other batch sizes (tests/test_export.py)."""
    traced = torch.jit.trace(module, example, check_trace=False)
    got = traced(*example)
    pairs = zip((eager,) if torch.is_tensor(eager) else eager, (got,) if torch.is_tensor(got) else got)
    for n, (expected, output) in enumerate(pairs):
        if output.shape == expected.shape and not expected.numel():
            continue  # the empty multi-scale feature of a network without the fusion path
        difference = float((output - expected).abs().max()) if output.shape == expected.shape else float("inf")
        if difference > 1e-4 * max(1.0, float(expected.abs().max())):
            raise RuntimeError(
                f"traced {type(module).__name__} output {n} differs from the network's: shape {tuple(output.shape)} "
                f"vs {tuple(expected.shape)}, max |difference| {difference:.3g}"
            )
    return traced


def trace_network(network: SAMUNet) -> ScriptedSAMUNet:
    """Trace ``network``'s encoder and decoder (batch 2, 3 points: neither is baked in) into a :class:`ScriptedSAMUNet`."""
    network = network.eval()
    size, mask_size = network.image_size, network.mask_input_size
    device = next(network.parameters()).device
    image = torch.rand(2, 3, size, size, device=device)
    encoder, decoder = _TwoFeatureEncoder(network), _TwoFeatureDecoder(network)
    with torch.no_grad():
        features = encoder(image)
        traced_encoder = _trace(encoder, (image,), features)
        coords, labels = pack_prompts(
            torch.tensor([[10.0, 20.0, 100.0, 120.0]] * 2), torch.rand(2, 1, 2) * size, torch.ones(2, 1)
        )
        example = (
            *features,
            coords.to(device),
            labels.to(device),
            torch.zeros(2, 1, mask_size, mask_size, device=device),
            torch.zeros(1, device=device),
        )
        traced_decoder = _trace(decoder, example, decoder(*example))
    return ScriptedSAMUNet(traced_encoder, traced_decoder, size, mask_size)


class TorchScriptExport(nn.Module):
    """The network as MONAI's ``ckpt_export`` sees it: checkpoint loading is strict and explains a mismatch, and
    ``torch.jit.script`` turns it into a :class:`ScriptedSAMUNet`.

    ``load_state_dict`` takes the bundle's ``{"model": ..., "network": contract}`` checkpoints as they are (no
    ``--key_in_ckpt``) and any format :mod:`bundle.networks.weights` reads; a checkpoint whose model contract names
    another network than the (argument-free) ``network_def`` of ``configs/inference.json`` replaces it with that one.
    """

    def __init__(self, network: SAMUNet) -> None:
        super().__init__()
        self.network = network

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        checkpoint = dict(state_dict)
        self.network = network_for(self.network, checkpoint)
        load_for_export(self.network, checkpoint)
        return nn.modules.module._IncompatibleKeys([], [])

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.network(image, boxes=boxes)

    def __prepare_scriptable__(self) -> ScriptedSAMUNet:
        return trace_network(self.network)
