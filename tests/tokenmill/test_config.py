"""Tests for tokenmill/config.py: presets, precedence, validation messages and --set parsing."""

import pytest

from tokenmill.config import (
    RunConfig,
    deep_merge,
    load_presets,
    load_recipes,
    parse_assignments,
    parse_duration,
    preset_names,
    resolve_config,
)
from tokenmill.errors import TokenmillError


def test_precedence_defaults_then_preset_then_catalog_then_overrides():
    catalog = {
        "data": {"context_len": 48, "val_fraction": 0.3},
        "tokenizer": {"model_type": "unigram"},
    }
    overrides = {"data": {"context_len": 40}, "train": {"lr": 5e-3}}

    cfg = resolve_config("tiny", catalog, overrides)

    assert cfg.preset == "tiny"
    # Set only by the field default.
    assert cfg.train.beta1 == 0.9
    assert cfg.data.seed == 1337
    # Preset over default; a sibling set by a higher layer does not erase it.
    assert cfg.model.n_layer == 2
    assert cfg.data.partition_bytes == 200_000
    # Catalog entry over preset, and over default.
    assert cfg.data.val_fraction == 0.3
    assert cfg.tokenizer.model_type == "unigram"
    assert cfg.tokenizer.vocab_size == 1024
    # Overrides over everything below them.
    assert cfg.data.context_len == 40
    assert cfg.train.lr == 5e-3
    assert cfg.train.warmup_steps == 10


def test_each_layer_alone_beats_the_one_below():
    assert resolve_config("default").data.context_len == 128
    assert RunConfig().data.context_len == 256
    assert resolve_config("default", {"data": {"context_len": 96}}).data.context_len == 96
    assert (
        resolve_config("default", {"data": {"context_len": 96}}, {"data": {"context_len": 80}}).data.context_len == 80
    )
    assert resolve_config("default", None, {"data": {"context_len": 80}}).data.context_len == 80


def test_resolving_does_not_leak_between_calls():
    resolve_config("tiny", {"data": {"context_len": 16}}, {"train": {"max_steps": 7}})
    cfg = resolve_config("tiny")
    assert cfg.data.context_len == 64
    assert cfg.train.max_steps == 300


def test_the_default_recipe_is_modern_and_gpt2_restores_the_first_one():
    modern = resolve_config("default")
    assert (modern.recipe, modern.train.optimizer, modern.train.schedule, modern.model.mlp) == (
        "modern",
        "muon",
        "wsd",
        "relu2",
    )
    assert modern.model.qk_norm and not modern.model.zero_init_proj
    gpt2 = resolve_config("default", None, {"recipe": "gpt2"})
    assert (gpt2.train.optimizer, gpt2.train.schedule, gpt2.train.min_lr_ratio) == ("adamw", "cosine", 0.1)
    assert (gpt2.model.mlp, gpt2.model.qk_norm, gpt2.model.zero_init_proj) == ("gelu", False, False)
    # The default preset's AdamW rate differs per recipe (its `gpt2:` block); the tiny preset's does not.
    assert (modern.train.lr, gpt2.train.lr) == (1e-2, 3e-3)
    assert resolve_config("tiny").train.lr == resolve_config("tiny", None, {"recipe": "gpt2"}).train.lr == 1e-2
    assert resolve_config("default", None, {"recipe": "gpt2", "train": {"lr": 1e-3}}).train.lr == 1e-3


def test_a_recipe_named_by_the_catalog_is_overridden_field_by_field():
    cfg = resolve_config("tiny", {"recipe": "gpt2"}, {"model": {"mlp": "relu2"}})
    assert cfg.recipe == "gpt2" and cfg.train.optimizer == "adamw" and cfg.model.mlp == "relu2"
    assert resolve_config("tiny", {"recipe": "gpt2"}, {"recipe": "modern"}).train.optimizer == "muon"


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(TokenmillError, match="unknown recipe 'nanogpt': choose one of modern, gpt2"):
        resolve_config("tiny", None, {"recipe": "nanogpt"})


@pytest.mark.parametrize(
    "text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("2.5m", 150), (" 3m ", 180)]
)
def test_durations_parse_to_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "0s", "-5m", "m"])
def test_a_bad_duration_is_a_clear_error(text):
    with pytest.raises(TokenmillError, match="bad budget"):
        parse_duration(text)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(TokenmillError) as exc:
        resolve_config("huge")
    message = str(exc.value)
    assert "huge" in message
    for name in ("default", "tiny", "small", "medium"):
        assert name in message


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"train": {"max_steps": "many"}}, "train.max_steps"),
        ({"train": {"max_stepz": 3}}, "train.max_stepz"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
        ({"tokenizer": {"vocab_size": 100}}, "tokenizer.vocab_size"),
        ({"data": {"normalize": "NFD"}}, "data.normalize"),
        ({"model": {"n_head": 3}}, "model"),
        ({"trian": {"lr": 1.0}}, "trian"),
    ],
)
def test_invalid_values_name_the_dotted_field(overrides, field):
    with pytest.raises(TokenmillError) as exc:
        resolve_config("tiny", None, overrides)
    message = str(exc.value)
    assert f"{field}:" in message
    assert "\n" not in message


def test_invalid_catalog_layer_is_reported_like_an_override():
    with pytest.raises(TokenmillError, match=r"data\.context_len"):
        resolve_config("tiny", {"data": {"context_len": 2}})


def test_unknown_field_message_says_how_to_fix_it():
    with pytest.raises(TokenmillError, match="unknown field; check the spelling"):
        resolve_config("default", None, {"train": {"max_stepz": 3}})


def test_parse_assignments_builds_typed_nested_overrides():
    parsed = parse_assignments(["train.lr=1e-3", "model.n_layer=6"])
    assert parsed == {"train": {"lr": 1e-3}, "model": {"n_layer": 6}}
    assert isinstance(parsed["train"]["lr"], float)
    assert isinstance(parsed["model"]["n_layer"], int)


def test_parse_assignments_keeps_strings_bools_and_merges_a_section():
    parsed = parse_assignments(
        [
            "train.device=cuda:1",
            "tokenizer.byte_fallback=false",
            "train.max_steps=10",
            "train.max_steps=20",
            " data.seed = 7",
        ]
    )
    assert parsed == {
        "train": {"device": "cuda:1", "max_steps": 20},
        "tokenizer": {"byte_fallback": False},
        "data": {"seed": 7},
    }


def test_parsed_assignments_resolve_into_the_config():
    cfg = resolve_config("tiny", None, parse_assignments(["train.lr=0.002", "model.n_layer=6"]))
    assert cfg.train.lr == 0.002
    assert cfg.model.n_layer == 6
    assert cfg.model.n_head == 2


def test_set_null_clears_a_preset_value_but_none_stays_a_string():
    # The small preset sets tokens_per_step; null hands the choice back to grad_accum.
    assert resolve_config("small").train.tokens_per_step == 131072
    cfg = resolve_config("small", None, parse_assignments(["train.tokens_per_step=null", "data.normalize=none"]))
    assert cfg.train.tokens_per_step is None
    assert cfg.data.normalize == "none"
    assert parse_assignments(["train.tokens_per_step=~"]) == {"train": {"tokens_per_step": None}}


@pytest.mark.parametrize("bad", ["noequals", "=3", "  =x"])
def test_parse_assignments_rejects_items_without_a_key(bad):
    with pytest.raises(TokenmillError, match="SECTION.FIELD=VALUE"):
        parse_assignments([bad])


def test_conflicting_assignments_give_a_tokenmill_error():
    # A section set to a scalar and then used as a section must be a user error, not a TypeError.
    with pytest.raises(TokenmillError):
        parse_assignments(["train=3", "train.lr=0.1"])


def _leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


@pytest.mark.parametrize("name", preset_names())
def test_every_bundled_preset_validates_and_takes_effect(name):
    layer = load_presets()[name] or {}
    for recipe in ("modern", *load_recipes()):  # the preset's own values, then those it keeps for a recipe
        cfg = resolve_config(name, None, {"recipe": recipe})
        assert cfg.preset == name
        values = deep_merge({k: v for k, v in layer.items() if k not in load_recipes()}, layer.get(recipe) or {})
        for path, value in _leaves(values):
            node = cfg
            for part in path:
                node = getattr(node, part)
            assert node == value, ".".join(path)


def test_bundled_presets_include_the_documented_ones():
    assert {"default", "tiny", "small", "medium"} <= set(preset_names())


def test_the_benchmarks_time_the_presets_shapes():
    """benchmarks/shapes.py repeats the presets' model shapes for the GPU machine, which has no PyYAML."""
    from benchmarks.shapes import SHAPES

    for name, shape in SHAPES.items():
        assert resolve_config(name).model.model_dump(include=set(shape)) == shape, name
