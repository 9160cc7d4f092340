"""Training and evaluation engines with simulated prompts (box, points, SAM-Med2D corrective clicks)."""

from .evaluator import DEFAULT_MODES, PromptModeMetric, SAMUNetEvaluator, parse_mode
from .handlers import AtomicCheckpointSaver, ProgressBar, PromptEvaluationReport, summarise, validation_available
from .interactive import InteractiveDecoding, InteractiveLoss
from .prompts import corrective_clicks, deepest_clicks, initial_prompts, valid_region
from .trainer import SAMUNetTrainer, TrainingOutOfMemoryError, flatten_masks

__all__ = [
    "DEFAULT_MODES",
    "PromptModeMetric",
    "SAMUNetEvaluator",
    "parse_mode",
    "AtomicCheckpointSaver",
    "ProgressBar",
    "PromptEvaluationReport",
    "summarise",
    "validation_available",
    "InteractiveDecoding",
    "InteractiveLoss",
    "corrective_clicks",
    "deepest_clicks",
    "initial_prompts",
    "valid_region",
    "SAMUNetTrainer",
    "TrainingOutOfMemoryError",
    "flatten_masks",
]
