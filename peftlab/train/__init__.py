"""Training: one loop on Accelerate for every method and task mode (`peftlab train`)."""

from .classifier import TextClassifier
from .config import RunConfig, TrainConfig, build_run_config, load_run_config
from .loop import Trainer, format_before_after, train

__all__ = ["RunConfig", "TextClassifier", "TrainConfig", "Trainer", "build_run_config", "format_before_after",
           "load_run_config", "train"]
