"""The shared training engine that every method runs on."""

from .engine import Method, TrainConfig, Trainer, TrainResult, TrainState, learning_rate, training_runtime

__all__ = ["Method", "TrainConfig", "TrainResult", "TrainState", "Trainer", "learning_rate", "training_runtime"]
