"""The networks that tokenmill trains; see model/gpt.py and model/classifier.py."""

from model.classifier import GPTClassifier
from model.gpt import GPT, PRESETS, GPTConfig, config_from_preset

__all__ = ["GPT", "GPTClassifier", "GPTConfig", "PRESETS", "config_from_preset"]
