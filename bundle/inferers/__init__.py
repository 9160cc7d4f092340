"""Prompted volume inference: slice-wise, batched, embedding cache, prompt propagation, file to file."""

from .cache import EmbeddingCache, MemoryCache
from .slice_inferer import PromptedSliceInferer, SliceFrame, SliceResult, check_intensity_range
from .volume import VolumeInferenceRunner, build_datalist, normalized_volume, output_path_for, to_slices
from .volume_prompts import PromptPlan, SlicePrompt, plan_prompts

__all__ = [
    "EmbeddingCache",
    "MemoryCache",
    "PromptedSliceInferer",
    "SliceFrame",
    "SliceResult",
    "VolumeInferenceRunner",
    "build_datalist",
    "check_intensity_range",
    "normalized_volume",
    "output_path_for",
    "to_slices",
    "PromptPlan",
    "SlicePrompt",
    "plan_prompts",
]
