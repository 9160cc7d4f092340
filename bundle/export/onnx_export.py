"""ONNX export of the image encoder and of the prompt encoder + mask decoder, as two files with the bundle's metadata.

``encoder.onnx``: ``image [B, 3, S, S]`` -> ``embedding [B, 256, e, e]`` (+ ``multi_scale [B, 32, 4e, 4e]`` with the
fusion path). ``decoder.onnx``: the encoder outputs (one row per prompt) + ``point_coords [B, P, 2]``,
``point_labels [B, P]``, ``mask_input [B, 1, 4e, 4e]``, ``has_mask_input [1]`` -> ``low_res_logits [B, 1, 4e, 4e]``.
Batch and number of points are dynamic. Prompt conventions: :mod:`bundle.export.modules`.

Each file carries ``metadata_props``: the bundle's name and version, the network configuration and its model
contract (JSON, with the pixel normalisation its weights expect), the image and mask sizes, the input / output names and a weights fingerprint shared by the
pair, so :class:`bundle.export.OnnxSAMUNet` refuses an encoder and a decoder from different exports.

The legacy TorchScript-based exporter is used: it reproduces the network within float rounding (``tests/
test_export.py``) and needs no extra package; torch's dynamo exporter needs ``onnxscript``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bundle.networks import SAMUNet
from bundle.networks.contract import make_contract, weights_fingerprint

from .modules import DECODER_PROMPT_INPUTS, ImageEncoderExport, PromptDecoderExport, feature_names, pack_prompts

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
OPSET = 17


def _example_prompts(network: SAMUNet, batch: int, device, clicks: int = 2) -> tuple[torch.Tensor, ...]:
    """A box and ``clicks`` clicks per row, no previous mask, packed for the decoder."""
    size, mask_size = network.image_size, network.mask_input_size
    generator = torch.Generator().manual_seed(clicks)
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.8]] * batch) * (size - 1)
    points = torch.rand(batch, clicks, 2, generator=generator) * (size - 1)
    coords, labels = pack_prompts(boxes, points, (torch.arange(clicks) % 2 == 0).float().expand(batch, clicks))
    return (
        coords.to(device),
        labels.to(device),
        torch.zeros(batch, 1, mask_size, mask_size, device=device),
        torch.zeros(1, device=device),
    )


def _metadata(network: SAMUNet, part: str, inputs, outputs, fingerprint: str, extra: dict) -> dict[str, str]:
    meta = {
        "part": part,
        "network": json.dumps(network.config),
        "image_size": str(network.image_size),
        "mask_input_size": str(network.mask_input_size),
        "feature_names": json.dumps(list(feature_names(network))),
        "inputs": json.dumps(list(inputs)),
        "outputs": json.dumps(list(outputs)),
        "weights_fingerprint": fingerprint,
        "network_contract": json.dumps(make_contract(network)),
        "torch_version": torch.__version__,
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def _write_onnx(module, args, path: Path, input_names, output_names, dynamic_axes, metadata: dict[str, str]) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter deprecation warnings
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_onnx(
    network: SAMUNet,
    output_dir: str | os.PathLike,
    metadata: dict | None = None,
    verify_image: torch.Tensor | None = None,
    atol: float = 1e-3,
    progress: bool = False,
) -> dict[str, Path]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` of ``network`` (weights loaded, eval) into ``output_dir``.

    ``metadata``: extra key -> value pairs for both files (e.g. the bundle's name and version).
    Before the files are put in place, both are run in ONNX Runtime on ``verify_image`` (``[B, 3, S, S]``, default
    random) and compared with PyTorch; a logit difference above ``atol`` raises ``RuntimeError`` and nothing is
    written. Non-finite weights raise ``ValueError`` naming them, and a NaN in either output counts as an infinite
    difference. Files are written to a temporary folder and moved in, so a failed export never leaves half a pair.
    ``progress``: a progress bar of the three stages (encoder, decoder, check) on stderr.
    """
    from bundle.networks.weights import require_finite_weights

    output_dir = Path(output_dir)
    network = network.eval()
    require_finite_weights(network.state_dict(), "network to export")
    device = next(network.parameters()).device
    names = feature_names(network)
    fingerprint = weights_fingerprint(network.state_dict())
    encoder, decoder = ImageEncoderExport(network), PromptDecoderExport(network)
    batch = {0: "batch"}
    image = verify_image if verify_image is not None else torch.rand(2, 3, network.image_size, network.image_size)
    image = image.to(device).float()
    if image.shape[0] == 1:  # trace with a batch of 2 so that verify_onnx's single-slice run checks a new batch size
        image = torch.cat([image, image.flip(-1)])
    with torch.no_grad():
        features = encoder(image)
    prompts = _example_prompts(network, image.shape[0], device)
    decoder_inputs = list(names) + list(DECODER_PROMPT_INPUTS)
    output_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=3, desc="ONNX export", unit="stage", file=sys.stderr, leave=False, disable=not progress)
    with bar, tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        staged = {ENCODER_FILE: Path(tmp) / ENCODER_FILE, DECODER_FILE: Path(tmp) / DECODER_FILE}
        bar.set_postfix_str("image encoder")
        _write_onnx(
            encoder,
            (image,),
            staged[ENCODER_FILE],
            ["image"],
            names,
            {"image": batch, **{n: batch for n in names}},
            _metadata(network, "image_encoder", ["image"], names, fingerprint, metadata or {}),
        )
        bar.update()
        bar.set_postfix_str("prompt decoder")
        _write_onnx(
            decoder,
            (*features, *prompts),
            staged[DECODER_FILE],
            decoder_inputs,
            ["low_res_logits"],
            {
                **{n: batch for n in names},
                "point_coords": {0: "batch", 1: "points"},
                "point_labels": {0: "batch", 1: "points"},
                "mask_input": batch,
                "low_res_logits": batch,
            },
            _metadata(network, "prompt_decoder", decoder_inputs, ["low_res_logits"], fingerprint, metadata or {}),
        )
        bar.update()
        bar.set_postfix_str("ONNX Runtime check")
        worst = verify_onnx(network, staged[ENCODER_FILE], staged[DECODER_FILE], image)
        bar.update()
        if worst > atol:
            raise RuntimeError(
                f"ONNX Runtime differs from PyTorch by {worst:.3g} (> {atol}) on the check input; nothing written"
            )
        logger.info("ONNX export checked against PyTorch: max |logit difference| %.2e", worst)
        written = {}
        for name, path in staged.items():
            os.replace(path, output_dir / name)
            written[name] = output_dir / name
    return written


def verify_onnx(network: SAMUNet, encoder_path, decoder_path, image: torch.Tensor) -> float:
    """Largest |difference| between PyTorch and ONNX Runtime, features and low-res logits, for ``image`` as one batch
    and for its first slice alone, with a box + 2 clicks and a box + 1 click (so batch size and number of points
    differ from the export's example inputs)."""
    from .onnx_runtime import OnnxSAMUNet

    runtime = OnnxSAMUNet(encoder_path, decoder_path, threads=None)
    encoder, decoder = ImageEncoderExport(network), PromptDecoderExport(network)
    worst = 0.0
    for batch in (image, image[:1]):
        with torch.no_grad():
            reference_features = encoder(batch)
        features = runtime.run_encoder(batch.cpu().numpy())
        worst = max([worst] + [_max_difference(f, r) for f, r in zip(features, reference_features)])
        for clicks in (2, 1):
            prompts = _example_prompts(network, batch.shape[0], batch.device, clicks)
            with torch.no_grad():
                reference = decoder(*reference_features, *prompts)
            low_res = runtime.run_decoder(
                [f.cpu().numpy() for f in reference_features], *(p.cpu().numpy() for p in prompts)
            )
            worst = max(worst, _max_difference(low_res, reference))
    return worst


def _max_difference(onnx_output: np.ndarray, reference: torch.Tensor) -> float:
    """Largest |difference|; ``inf`` when either side is not finite (``max`` would drop a NaN)."""
    difference = np.abs(onnx_output - reference.cpu().numpy())
    return float(difference.max()) if np.isfinite(difference).all() else float("inf")
