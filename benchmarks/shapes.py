"""The network shapes the benchmarks time, by the name of the tokenmill preset they come from.

The GPU machine has torch but not pydantic or PyYAML, so the benchmarks cannot read
tokenmill/presets.yaml there; tests/test_config.py checks that these shapes stay the presets'.
"""

SHAPES = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64},
    "default": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "small": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # GPT-2 124M
    "medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},  # GPT-2 350M
}


def gpt_config(config_class, preset: str, **fields):
    """`config_class` (a GPTConfig) with the preset's shape and `fields` (vocab_size, block_size...)."""
    if preset not in SHAPES:
        raise SystemExit(f"unknown preset {preset!r}; use one of {', '.join(SHAPES)}")
    return config_class(**SHAPES[preset], **fields)
