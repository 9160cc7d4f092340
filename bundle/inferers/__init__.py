"""Prompted volume inference (slice-wise, batched, embedding cache, prompt propagation, several objects, mask
prompts, file to file) and sliding-window inference at the image's own resolution."""

from .cache import EmbeddingCache, MemoryCache
from .evaluation import ObjectEvaluator, dice_nsd, object_evaluator
from .mask_prompts import check_label_map, label_map_plans, label_values, load_mask_prompt, mask_plan
from .objects import SegmentationObject, plan_objects
from .session import InteractionSession, SessionStore, SliceState
from .slice_inferer import PromptedSliceInferer, SliceFrame, SliceResult, check_intensity_range
from .volume import VolumeInferenceRunner, build_datalist, normalized_volume, output_path_for, to_slices
from .volume_prompts import PromptPlan, SlicePrompt, plan_prompts
from .windows import BACKGROUND_LOGIT, BoxWindowInferer, SlidingWindowSliceInferer

__all__ = [
    "BACKGROUND_LOGIT",
    "BoxWindowInferer",
    "SlidingWindowSliceInferer",
    "EmbeddingCache",
    "MemoryCache",
    "InteractionSession",
    "SessionStore",
    "SliceState",
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
    "SegmentationObject",
    "plan_objects",
    "check_label_map",
    "label_map_plans",
    "label_values",
    "load_mask_prompt",
    "mask_plan",
    "ObjectEvaluator",
    "dice_nsd",
    "object_evaluator",
]
