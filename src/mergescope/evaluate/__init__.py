"""Evaluation: loss and accuracy of many models in one data pass."""
from .evaluate import evaluate_models

__all__ = ["evaluate_models"]
