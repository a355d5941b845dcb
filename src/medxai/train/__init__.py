"""Training: optimiser, schedule, epochs, checkpoints, early stopping and exact resume."""

from medxai.train._device import autocast_context, resolve_device
from medxai.train.fit import FitResult, fit
from medxai.train.loop import BatchContext, model_input, predict_split

__all__ = [
    "fit",
    "FitResult",
    "BatchContext",
    "predict_split",
    "model_input",
    "resolve_device",
    "autocast_context",
]
