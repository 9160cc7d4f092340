"""Deployment: TorchScript (``ckpt_export``) and ONNX export of the encoder and decoder, ONNX Runtime inference."""

from .checkpoint import load_for_export
from .compiled import CompiledEncoderSAMUNet, torch_compile_encoder, trt_compile_encoder
from .modules import ImageEncoderExport, PromptDecoderExport, pack_prompts
from .onnx_export import export_onnx, verify_onnx
from .onnx_runtime import OnnxSAMUNet
from .torchscript import ScriptedSAMUNet, TorchScriptExport, trace_network

__all__ = [
    "CompiledEncoderSAMUNet",
    "ImageEncoderExport",
    "OnnxSAMUNet",
    "PromptDecoderExport",
    "ScriptedSAMUNet",
    "TorchScriptExport",
    "export_onnx",
    "load_for_export",
    "pack_prompts",
    "torch_compile_encoder",
    "trace_network",
    "trt_compile_encoder",
    "verify_onnx",
]
