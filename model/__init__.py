"""The networks that tokenmill trains; see model/gpt.py and model/classifier.py."""

from model.classifier import GPTClassifier
from model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTClassifier", "GPTConfig"]
