"""The document filters on literal documents: each filter's boundary, the presets, and the one-line
errors for unknown filters and invalid thresholds."""

import random

import pytest

from tasks.preprocess.quality import Measures, failing_filter, measure_all
from tokenmill.config import DataConfig, resolve_config
from tokenmill.data_quality import FILTERS, QualityConfig
from tokenmill.errors import TokenmillError

PROSE = "The river runs past the old stone garden and the light falls on the water."
ENGLISH = (
    "the of and to in that river stone garden light water morning quiet walked slowly towards "
    "old house window evening bright cold warm people city road under over between after before"
).split()


def essay(seed: int, n_sentences: int = 20) -> str:
    r = random.Random(seed)
    return " ".join(
        " ".join(r.choice(ENGLISH) for _ in range(r.randint(6, 14))).capitalize() + "." for _ in range(n_sentences)
    )


def only(name: str, **setting) -> QualityConfig:
    return QualityConfig(**{name: {"enabled": True, **setting}})


def words(n: int, word: str = "word") -> str:
    return " ".join(f"{word}{i}" for i in range(n))


@pytest.mark.parametrize(
    ("name", "setting", "passes", "fails"),
    [
        ("word_count", {"min": 3, "max": 5}, "a b c", "a b"),
        ("word_count", {"min": 3, "max": 5}, "a b c d e", "a b c d e f"),
        ("mean_word_length", {"min": 3, "max": 10}, "abc abc", "ab ab"),
        ("mean_word_length", {"min": 3, "max": 10}, "a" * 10, "a" * 11),
        ("symbol_ratio", {"max": 0.1}, words(9) + " #", words(8) + " #"),
        ("symbol_ratio", {"max": 0.1}, words(10) + " ...", words(4) + " … …"),
        ("alpha_words", {"min": 0.8}, "a b c d 1", "a b c 1 2"),
        ("alpha_chars", {"min": 0.5}, "ab12", "a123"),
        ("bullet_lines", {"max": 0.5}, "- one\ntwo", "- one\n• two\nthree"),
        ("ellipsis_lines", {"max": 0.3}, "one...\ntwo\nthree\nfour", "one...\ntwo…\nthree"),
        ("duplicate_lines", {"max": 0.3}, "a\nb\nc\na", "a\nb\na\na"),
        ("duplicate_line_chars", {"max": 0.2}, "long line here\nlong line here\n" + "x" * 60, "aaaa\naaaa\nb"),
        ("top_ngram", {"max": {2: 0.5}}, "a b c d e f g a b", "a b c d a b"),
        ("duplicate_ngram", {"max": {3: 0.4}}, "a b c d e f a b c", "a b c a b c a b c"),
    ],
)
def test_each_filter_passes_at_its_limit_and_fails_beyond_it(name, setting, passes, fails):
    cfg = only(name, **setting)
    assert failing_filter(passes, cfg) is None
    assert failing_filter(fails, cfg) == name


def test_a_filter_turned_off_or_the_none_preset_drops_nothing():
    assert failing_filter("", QualityConfig()) is None
    assert failing_filter("a", QualityConfig(preset="prose", word_count=False, mean_word_length=False)) is None
    assert failing_filter("a", QualityConfig(preset="prose")) == "word_count"


def test_the_first_failing_filter_in_the_fixed_order_is_the_reason():
    cfg = QualityConfig(preset="prose")
    assert failing_filter("# # #", cfg) == "word_count"
    text = " ".join(["1234"] * 60)  # enough words of a fine length, but no letters
    assert failing_filter(text, cfg) == "alpha_words"


def test_prose_keeps_ordinary_prose_and_code_keeps_source_code():
    assert failing_filter(essay(0), QualityConfig(preset="prose")) is None
    source = "\n".join(
        [
            "# helpers for the table",
            "import os",
            "",
            *[f"def f{i}(x, y=None):\n    # step {i}\n    return x * {i} + (y or 0)\n" for i in range(30)],
        ]
    )
    assert failing_filter(source, QualityConfig(preset="code")) is None
    assert failing_filter(source, QualityConfig(preset="prose")) is not None


def test_code_drops_data_tables_and_one_line_repeated():
    code = QualityConfig(preset="code")
    assert failing_filter("\n".join(f"{i}, {i * 7}, {i * 13}," for i in range(200)), code) == "alpha_chars"
    assert failing_filter("\n".join(["print('again and again')"] * 100), code) == "duplicate_lines"


def test_overrides_layer_over_the_preset_field_by_field():
    cfg = QualityConfig(preset="prose", word_count={"min": 5})
    assert (cfg.word_count.min, cfg.word_count.max) == (5, 100_000)
    assert cfg.duplicate_ngram.max == {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    assert [name for name, _ in QualityConfig(preset="prose").active()] == [n for n in FILTERS if n != "alpha_chars"]
    assert QualityConfig.model_validate(cfg.model_dump()) == cfg
    assert [name for name, _ in QualityConfig(word_count={"min": 3}).active()] == ["word_count"]  # setting turns it on
    assert QualityConfig(word_count={"enabled": False, "min": 3}).active() == []


def test_measures_report_every_filter():
    m = measure_all(PROSE, QualityConfig(preset="prose"))
    assert m["word_count"] == 15 and m["duplicate_ngram_5"] == 0.0
    assert Measures("a\n\n a \nb").lines == ["a", "a", "b"]


@pytest.mark.parametrize(
    ("quality", "expected"),
    [
        ({"wordcount": {"min": 3}}, "unknown filter 'wordcount'; choose from word_count,"),
        ({"preset": "web"}, "data.quality.preset: Input should be 'none', 'code' or 'prose'"),
        ({"alpha_words": {"min": 1.5}}, "alpha_words: min and max must be between 0 and 1, not 1.5"),
        ({"word_count": {"min": 10, "max": 5}}, "word_count: min (10.0) must not exceed max (5.0)"),
        ({"top_ngram": {"max": {0: 0.2}}}, "top_ngram: each limit must be n: fraction with n in 1..10"),
        ({"word_count": {"minimum": 3}}, "data.quality.word_count.minimum: unknown field"),
    ],
)
def test_bad_quality_settings_fail_in_one_line_naming_the_field(quality, expected):
    with pytest.raises(TokenmillError) as err:
        resolve_config("tiny", overrides={"data": {"quality": quality}})
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("near_dup", "expected"),
    [
        ({"threshold": 1.5}, "data.near_dup.threshold: Input should be less than or equal to 0.99"),
        ({"ngram": 0}, "data.near_dup.ngram: Input should be greater than or equal to 1"),
        ({"bands": 4}, "data.near_dup.bands: unknown field"),
    ],
)
def test_bad_near_dup_settings_fail_in_one_line_naming_the_field(near_dup, expected):
    with pytest.raises(TokenmillError, match=expected):
        resolve_config("tiny", overrides={"data": {"near_dup": near_dup}})


def test_defaults_remove_near_duplicates_and_filter_nothing():
    data = DataConfig()
    assert data.near_dup.enabled and data.near_dup.threshold == 0.8 and data.near_dup.ngram == 5
    assert data.quality.preset == "none" and data.quality.active() == []
