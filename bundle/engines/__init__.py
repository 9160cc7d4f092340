"""Training and evaluation engines with simulated prompts (box, points, SAM-Med2D corrective clicks)."""

from . import data  # noqa: F401  (configs use bundle.engines.data.*)
from .evaluator import DEFAULT_MODES, PromptModeMetric, SAMUNetEvaluator, parse_mode
from .handlers import AtomicCheckpointSaver, PromptEvaluationReport, check_files, summarise
from .interactive import InteractiveDecoding, unwrap
from .prompts import corrective_clicks, initial_prompts, valid_region
from .trainer import SAMUNetTrainer, flatten_masks

__all__ = [
    "DEFAULT_MODES",
    "PromptModeMetric",
    "SAMUNetEvaluator",
    "parse_mode",
    "AtomicCheckpointSaver",
    "PromptEvaluationReport",
    "check_files",
    "summarise",
    "InteractiveDecoding",
    "unwrap",
    "corrective_clicks",
    "initial_prompts",
    "valid_region",
    "SAMUNetTrainer",
    "flatten_masks",
]
