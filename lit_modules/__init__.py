"""LightningModules of the project."""
from lit_modules.classifier import OPTIMIZERS, SCHEDULERS, TTA_MODES, ImageClassifier

__all__ = ["ImageClassifier", "OPTIMIZERS", "SCHEDULERS", "TTA_MODES"]
