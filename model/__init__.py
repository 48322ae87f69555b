"""The GPT network that tokenmill trains; see model/gpt.py."""

from model.gpt import GPT, PRESETS, GPTConfig, config_from_preset

__all__ = ["GPT", "GPTConfig", "PRESETS", "config_from_preset"]
