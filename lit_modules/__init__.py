"""LightningModules of the project."""
from lit_modules.classifier import OPTIMIZERS, SCHEDULERS, ImageClassifier

__all__ = ["ImageClassifier", "OPTIMIZERS", "SCHEDULERS"]
