"""Prompted volume inference: slice-wise, batched, embedding cache, prompt propagation, file IO."""

from .cache import EmbeddingCache
from .slice_inferer import PromptedSliceInferer, SliceFrame, SliceResult
from .volume import VolumeInferenceRunner, build_datalist, load_image, output_path_for, write_mask
from .volume_prompts import PromptPlan, SlicePrompt, plan_prompts

__all__ = [
    "EmbeddingCache",
    "PromptedSliceInferer",
    "SliceFrame",
    "SliceResult",
    "VolumeInferenceRunner",
    "build_datalist",
    "load_image",
    "output_path_for",
    "write_mask",
    "PromptPlan",
    "SlicePrompt",
    "plan_prompts",
]
