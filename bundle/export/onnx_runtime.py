"""Run an exported encoder / decoder pair in ONNX Runtime behind the :class:`~bundle.networks.SAMUNet` interface.

:class:`OnnxSAMUNet` has ``encode``, ``decode_low_res``, ``upsample_logits``, ``decode``, ``forward``, ``image_size``
and ``mask_input_size`` like the PyTorch network, so the bundle's inferers (``PromptedSliceInferer``, the volume
runner) use it unchanged; ``configs/inference_onnx.json`` is ``configs/inference.json`` on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from bundle.networks.interface import PromptableNetworkMixin
from bundle.networks.sam_unet import check_prompts

from .modules import DECODER_PROMPT_INPUTS, pack_prompts


class OnnxSAMUNet(PromptableNetworkMixin, nn.Module):
    """``encoder.onnx`` + ``decoder.onnx`` in ONNX Runtime sessions.

    Args:
        encoder, decoder: the two files of one :func:`~bundle.export.export_onnx` call (checked: same weights
            fingerprint, the expected parts).
        threads: intra-op threads of each session (default: ``torch.get_num_threads()``).
        providers: ONNX Runtime execution providers (default CPU; e.g. ``["CUDAExecutionProvider"]``).

    Inputs and outputs are torch tensors on the CPU, as the bundle's inferers pass them.
    """

    def __init__(
        self, encoder: str | os.PathLike, decoder: str | os.PathLike, threads: int | None = None, providers=None
    ) -> None:
        super().__init__()
        import onnxruntime as ort

        for path in (encoder, decoder):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such ONNX file (write it with scripts/export.py)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = list(providers or ["CPUExecutionProvider"])
        self.encoder_session = ort.InferenceSession(str(encoder), options, providers=providers)
        self.decoder_session = ort.InferenceSession(str(decoder), options, providers=providers)
        meta = dict(self.encoder_session.get_modelmeta().custom_metadata_map)
        decoder_meta = dict(self.decoder_session.get_modelmeta().custom_metadata_map)
        if meta.get("part") != "image_encoder" or decoder_meta.get("part") != "prompt_decoder":
            raise ValueError(
                f"{encoder} / {decoder}: expected an image encoder and a prompt decoder written by scripts/export.py, "
                f"got parts {meta.get('part')!r} / {decoder_meta.get('part')!r}"
            )
        if meta.get("weights_fingerprint") != decoder_meta.get("weights_fingerprint"):
            raise ValueError(
                f"{encoder} and {decoder} come from different exports (weights fingerprints "
                f"{meta.get('weights_fingerprint')} vs {decoder_meta.get('weights_fingerprint')}); export them together"
            )
        self.metadata = meta
        self.config = json.loads(meta["network"])
        self.image_size = int(meta["image_size"])
        self.mask_input_size = int(meta["mask_input_size"])
        self.feature_names = tuple(json.loads(meta["feature_names"]))
        contract = json.loads(meta["network_contract"]) if "network_contract" in meta else {}
        self.pixel_normalization = contract.get("pixel_normalization", meta.get("pixel_normalization", "sam"))
        self.source = f"{encoder}, {decoder}"

    # ----------------------------------------------------------------------------------------------------- raw sessions
    def run_encoder(self, image: np.ndarray) -> list[np.ndarray]:
        """``image [B, 3, S, S]`` float32 -> the feature arrays (``feature_names`` order)."""
        return self.encoder_session.run(None, {"image": np.ascontiguousarray(image, dtype=np.float32)})

    def run_decoder(self, features, point_coords, point_labels, mask_input, has_mask_input) -> np.ndarray:
        """Packed prompts (one row per prompt, features already repeated per prompt) -> low-res logits."""
        feeds = {name: np.ascontiguousarray(f, dtype=np.float32) for name, f in zip(self.feature_names, features)}
        values = (point_coords, point_labels, mask_input, has_mask_input)
        feeds.update(
            {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in zip(DECODER_PROMPT_INPUTS, values)}
        )
        return self.decoder_session.run(None, feeds)[0]

    # ------------------------------------------------------------------------------------------ the SAMUNet interface
    def encode(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, 3, S, S]`` -> ``{"embedding", "multi_scale"?}`` (CPU float32 tensors)."""
        image = torch.as_tensor(image)
        if image.ndim != 4 or tuple(image.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"image must be [B, 3, {self.image_size}, {self.image_size}], got {tuple(image.shape)}")
        outputs = self.run_encoder(image.detach().float().cpu().numpy())
        return {name: torch.from_numpy(out) for name, out in zip(self.feature_names, outputs)}

    def decode_low_res(
        self, features, boxes=None, points=None, point_labels=None, mask_inputs=None, image_index=None
    ) -> torch.Tensor:
        """As :meth:`SAMUNet.decode_low_res`: one row per prompt, ``image_index`` maps prompts to images."""
        batch = features["embedding"].shape[0]
        cpu = torch.device("cpu")
        boxes, points, point_labels, mask_inputs, image_index = check_prompts(
            self.image_size, self.mask_input_size, cpu, batch, boxes, points, point_labels, mask_inputs, image_index
        )
        coords, labels = pack_prompts(boxes, points, point_labels)
        index = image_index.numpy()
        rows = [features[name].detach().float().cpu().numpy()[index] for name in self.feature_names]
        has_mask = np.ones(1, np.float32) if mask_inputs is not None else np.zeros(1, np.float32)
        if mask_inputs is None:
            mask_inputs = torch.zeros(len(index), 1, self.mask_input_size, self.mask_input_size)
        low_res = self.run_decoder(
            rows, coords.numpy(), labels.numpy(), mask_inputs.detach().float().cpu().numpy(), has_mask
        )
        return torch.from_numpy(low_res)

    def extra_repr(self) -> str:
        return f"{self.source}, {self.config}"
