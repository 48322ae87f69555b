"""tokenmill: raw text corpora to a trained, evaluated and registered Transformer."""

__version__ = "0.1.0"
