"""Tests for data_catalog/loader.py: loading the YAML catalog and resolving corpora to files."""

import json
import os
import textwrap
from pathlib import Path

import fsspec
import pytest

from data_catalog.loader import CorpusEntry, fingerprint, list_files, load_catalog, resolve_corpus
from tasks.preprocess.sources import file_format
from tokenmill.errors import TokenmillError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def catalog_file(tmp_path: Path, body: str) -> Path:
    return write(tmp_path / "catalog.yaml", body)


def user_error(call) -> str:
    """The message of the TokenmillError `call` raises; it must be one line."""
    with pytest.raises(TokenmillError) as exc:
        call()
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- the bundled catalog -------------------------------------------------------------------


def test_bundled_catalog_resolves_the_standard_library():
    corpus = resolve_corpus("python-stdlib")
    assert corpus.name == "python-stdlib"
    assert corpus.entry.format == "text"
    assert len(corpus.files) > 1000
    assert all(f.path.endswith(".py") for f in corpus.files)
    assert not any("site-packages" in f.path for f in corpus.files)
    assert any(f.path.endswith(os.sep + "os.py") for f in corpus.files)
    assert [f.path for f in corpus.files] == sorted(f.path for f in corpus.files)
    assert corpus.total_bytes == sum(f.size for f in corpus.files) > 1_000_000


def test_unknown_name_lists_the_known_names():
    message = user_error(lambda: resolve_corpus("no-such-corpus"))
    assert "no-such-corpus" in message
    assert "python-stdlib" in message


def test_unknown_name_lists_the_names_of_a_given_catalog(tmp_path):
    write(tmp_path / "a" / "x.txt", "x")
    path = catalog_file(tmp_path, "corpora:\n  beta: {paths: [a]}\n  alpha: {paths: [a]}\n")
    message = user_error(lambda: resolve_corpus("gamma", path))
    assert "alpha, beta" in message


# --- catalog errors ------------------------------------------------------------------------


def test_missing_catalog_file(tmp_path):
    message = user_error(lambda: load_catalog(tmp_path / "nope.yaml"))
    assert "not found" in message
    assert "nope.yaml" in message


def test_invalid_yaml_names_the_line(tmp_path):
    path = catalog_file(tmp_path, "corpora:\n  x:\n    paths: [a\n  y: {\n")
    message = user_error(lambda: load_catalog(path))
    assert "not valid YAML" in message
    assert "line" in message


@pytest.mark.parametrize("body", ["", "- a\n- b\n", "corpus:\n  x: {paths: [a]}\n", "corpora: [a, b]\n"])
def test_top_level_without_a_corpora_mapping(tmp_path, body):
    path = catalog_file(tmp_path, body)
    assert "'corpora:'" in user_error(lambda: load_catalog(path))


def test_unknown_field_names_the_entry_and_the_field(tmp_path):
    path = catalog_file(tmp_path, "corpora:\n  books:\n    paths: [a]\n    fromat: text\n")
    message = user_error(lambda: load_catalog(path))
    assert "'books'" in message
    assert "'fromat'" in message
    assert "unknown field" in message


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ("{paths: a.txt}", "paths"),
        ("{paths: []}", "paths"),
        ("{paths: [a], format: csv}", "format"),
        ("{paths: [a], data: 3}", "data"),
        ("{paths: [a], exclude: 5}", "exclude"),
    ],
)
def test_wrong_type_names_the_entry_and_the_field(tmp_path, entry, field):
    path = catalog_file(tmp_path, f"corpora:\n  books: {entry}\n")
    message = user_error(lambda: load_catalog(path))
    assert "'books'" in message
    assert f"field '{field}'" in message


def test_a_valid_catalog_loads_with_defaults(tmp_path):
    path = catalog_file(tmp_path, "corpora:\n  books:\n    paths: [data/*.txt]\n    data: {context_len: 64}\n")
    catalog, where = load_catalog(path)
    entry = catalog.corpora["books"]
    assert where == path
    assert entry.format == "text"
    assert entry.exclude == []
    assert entry.data == {"context_len": 64}


# --- resolving paths -----------------------------------------------------------------------


def test_relative_paths_resolve_against_the_catalog_folder(tmp_path, monkeypatch):
    root = tmp_path / "project"
    write(root / "texts" / "a.txt", "alpha")
    write(root / "texts" / "sub" / "b.txt", "beta")
    write(root / "texts" / "c.md", "gamma")
    path = catalog_file(root, "corpora:\n  books:\n    paths: [texts/**/*.txt]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    corpus = resolve_corpus("books", path)

    assert [Path(f.path) for f in corpus.files] == [root / "texts" / "a.txt", root / "texts" / "sub" / "b.txt"]
    assert corpus.files[0].size == 5


def test_a_directory_in_paths_takes_every_file_below_it(tmp_path):
    write(tmp_path / "d" / "a.txt", "a")
    write(tmp_path / "d" / "deep" / "er" / "b.py", "b")
    path = catalog_file(tmp_path, "corpora:\n  all: {paths: [d]}\n")
    corpus = resolve_corpus("all", path)
    assert [Path(f.path).name for f in corpus.files] == ["a.txt", "b.py"]


def test_overlapping_patterns_list_a_file_once(tmp_path):
    write(tmp_path / "d" / "a.txt", "a")
    path = catalog_file(tmp_path, "corpora:\n  all: {paths: [d, d/*.txt, d/a.txt]}\n")
    assert len(resolve_corpus("all", path).files) == 1


def test_exclude_drops_matching_files(tmp_path):
    write(tmp_path / "src" / "keep.py", "k")
    write(tmp_path / "src" / "tests" / "test_x.py", "t")
    write(tmp_path / "src" / "gen_pb2.py", "g")
    path = catalog_file(
        tmp_path, "corpora:\n  code:\n    paths: [src/**/*.py]\n    exclude: ['*/tests/*', '*_pb2.py']\n"
    )
    corpus = resolve_corpus("code", path)
    assert [Path(f.path).name for f in corpus.files] == ["keep.py"]


def test_a_corpus_that_matches_nothing_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    path = catalog_file(tmp_path, "corpora:\n  none: {paths: [empty, 'missing/*.txt']}\n")
    message = user_error(lambda: resolve_corpus("none", path))
    assert "'none'" in message
    assert "matched no files" in message


def test_a_corpus_whose_files_are_all_excluded_errors(tmp_path):
    write(tmp_path / "d" / "a.txt", "a")
    path = catalog_file(tmp_path, "corpora:\n  gone: {paths: [d], exclude: ['*.txt']}\n")
    assert "matched no files" in user_error(lambda: resolve_corpus("gone", path))


# --- ad-hoc corpora ------------------------------------------------------------------------


def test_a_directory_becomes_an_ad_hoc_corpus_with_the_format_inferred_per_file(tmp_path):
    write(tmp_path / "My Notes" / "a.txt", "a")
    write(tmp_path / "My Notes" / "b" / "c.jsonl.gz", "c")
    corpus = resolve_corpus(str(tmp_path / "My Notes") + "/")
    assert corpus.name == "My-Notes"
    assert corpus.entry.format == "auto"
    assert [file_format(f.path, "auto") for f in corpus.files] == ["text", "jsonl"]
    assert len(corpus.files) == 2


def test_a_glob_becomes_an_ad_hoc_corpus(tmp_path):
    write(tmp_path / "d" / "a.jsonl", '{"text": "a"}\n')
    write(tmp_path / "d" / "b.jsonl", '{"text": "b"}\n')
    write(tmp_path / "d" / "c.txt", "c")
    corpus = resolve_corpus(str(tmp_path / "d" / "*.jsonl"))
    assert corpus.entry.format == "auto"
    assert [Path(f.path).name for f in corpus.files] == ["a.jsonl", "b.jsonl"]


def test_a_single_file_becomes_an_ad_hoc_corpus(tmp_path):
    path = write(tmp_path / "dump.ndjson", '{"text": "a"}\n')
    corpus = resolve_corpus(str(path))
    assert corpus.name == "dump.ndjson"
    assert file_format(corpus.files[0].path, corpus.entry.format) == "jsonl"
    assert [f.path for f in corpus.files] == [str(path)]


def test_a_relative_glob_resolves_against_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "d" / "a.txt", "a")
    monkeypatch.chdir(tmp_path)
    corpus = resolve_corpus("d/*.txt")
    assert [f.path for f in corpus.files] == [str(tmp_path / "d" / "a.txt")]


def test_a_glob_under_the_home_directory_is_an_ad_hoc_corpus(tmp_path, monkeypatch):
    # Quoting a glob to keep the shell off it also keeps the shell from expanding `~`.
    write(tmp_path / "data" / "a.jsonl", '{"text": "a"}\n')
    monkeypatch.setenv("HOME", str(tmp_path))
    corpus = resolve_corpus("~/data/*.jsonl")
    assert [f.path for f in corpus.files] == [str(tmp_path / "data" / "a.jsonl")]


def test_a_glob_that_matches_nothing_is_an_unknown_corpus(tmp_path):
    message = user_error(lambda: resolve_corpus(str(tmp_path / "*.jsonl")))
    assert "unknown corpus" in message


# --- fingerprint ---------------------------------------------------------------------------


@pytest.fixture
def corpus_dir(tmp_path):
    write(tmp_path / "c" / "a.txt", "alpha alpha")
    write(tmp_path / "c" / "b.txt", "beta beta")
    return tmp_path / "c"


def fp(corpus_dir: Path) -> str:
    return resolve_corpus(str(corpus_dir)).fingerprint


def test_fingerprint_is_stable_when_nothing_changes(corpus_dir):
    first = fp(corpus_dir)
    (corpus_dir / "a.txt").read_text()
    assert fp(corpus_dir) == first
    assert len(first) == 64


def test_fingerprint_changes_when_a_file_grows(corpus_dir):
    before = fp(corpus_dir)
    path = corpus_dir / "a.txt"
    st = path.stat()
    path.write_text("alpha alpha alpha")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # only the size differs
    assert fp(corpus_dir) != before


def test_fingerprint_changes_when_a_file_is_edited_in_place(corpus_dir):
    before = fp(corpus_dir)
    path = corpus_dir / "a.txt"
    st = path.stat()
    path.write_text("ALPHA ALPHA")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as an edit a second later
    assert fp(corpus_dir) != before


def test_fingerprint_changes_when_a_file_is_touched(corpus_dir):
    before = fp(corpus_dir)
    path = corpus_dir / "b.txt"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert fp(corpus_dir) != before


def test_fingerprint_changes_when_a_file_is_added_or_removed(corpus_dir):
    before = fp(corpus_dir)
    write(corpus_dir / "c.txt", "gamma")
    added = fp(corpus_dir)
    assert added != before
    (corpus_dir / "c.txt").unlink()
    assert fp(corpus_dir) == before


def test_fingerprint_changes_when_the_entry_changes(corpus_dir):
    files = list_files(CorpusEntry(paths=[str(corpus_dir)]), Path("/"))
    as_text = fingerprint(CorpusEntry(paths=[str(corpus_dir)]), files)
    as_lines = fingerprint(CorpusEntry(paths=[str(corpus_dir)], format="lines"), files)
    assert as_text != as_lines


# --- per-entry settings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ("data: {val_fraction: 1.5}", "data.val_fraction"),
        ("data: {min_char: 3}", "data.min_char"),
        ("data: {normalize: NFD}", "data.normalize"),
        ("data: {on_decode_error: ignore}", "data.on_decode_error"),
        ("tokenizer: {vocab_size: 10}", "tokenizer.vocab_size"),
        ("tokenizer: {model: bpe}", "tokenizer.model"),
    ],
)
def test_bad_settings_in_an_entry_name_file_entry_and_field(tmp_path, block, field):
    path = catalog_file(tmp_path, f"corpora:\n  books:\n    paths: [a]\n    {block}\n")
    message = user_error(lambda: load_catalog(path))
    assert str(path) in message and "'books'" in message and f"field '{field}'" in message


def test_entry_settings_sit_between_preset_and_command_line(tmp_path, monkeypatch):
    from tasks.run.plan import plan_run

    write(tmp_path / "d" / "a.jsonl", '{"body": "x"}\n')
    path = catalog_file(
        tmp_path,
        textwrap.dedent("""\
        corpora:
          books:
            description: Books.
            license: CC-BY-4.0
            paths: [d]
            format: jsonl
            text_field: body
            data: {val_fraction: 0.25, seed: 7, normalize: NFKC, min_chars: 5, max_chars: 900, context_len: 48}
            tokenizer: {vocab_size: 2000, model_type: unigram}
        """),
    )
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    plan = plan_run("books", "tiny", ["data.context_len=40"], catalog=str(path))
    data, tok = plan.config.data, plan.config.tokenizer
    assert (data.val_fraction, data.seed, data.normalize, data.min_chars, data.max_chars) == (0.25, 7, "NFKC", 5, 900)
    assert data.context_len == 40  # the command line beats the entry
    assert data.partition_bytes == 200_000  # the preset fills what the entry leaves
    assert (tok.vocab_size, tok.model_type) == (2000, "unigram")
    assert (plan.corpus.entry.license, plan.corpus.entry.text_field) == ("CC-BY-4.0", "body")


def test_a_reused_tokenizer_path_is_relative_to_the_catalog(tmp_path, monkeypatch):
    write(tmp_path / "d" / "a.txt", "a")
    write(tmp_path / "tok" / "tokenizer.model", "x")
    path = catalog_file(
        tmp_path,
        "corpora:\n  b: {paths: [d], tokenizer: {reuse: tok/tokenizer.model}}\n"
        "  c: {paths: [d], tokenizer: {reuse: b}}\n",
    )
    monkeypatch.chdir(tmp_path / "d")
    assert resolve_corpus("b", path).entry.tokenizer["reuse"] == str(tmp_path / "tok" / "tokenizer.model")
    assert resolve_corpus("c", path).entry.tokenizer["reuse"] == "b"  # a corpus name stays a name


# --- sources -------------------------------------------------------------------------------


def test_a_missing_plain_path_is_named(tmp_path):
    write(tmp_path / "d" / "a.txt", "a")
    path = catalog_file(tmp_path, "corpora:\n  books: {paths: [d, nowhere/file.txt]}\n")
    message = user_error(lambda: resolve_corpus("books", path))
    assert "'books'" in message and "'nowhere/file.txt' does not exist" in message


def test_fsspec_urls_list_files_with_their_size(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe({"/cat/a.jsonl": b'{"text": "a"}\n', "/cat/sub/b.txt": b"bb", "/cat/c.txt": b"ccc"})
    path = catalog_file(
        tmp_path,
        "corpora:\n  mem: {paths: ['memory:///cat'], exclude: ['*.jsonl']}\n  glob: {paths: ['memory:///cat/*.txt']}\n",
    )
    mem = resolve_corpus("mem", path)
    assert [(f.path, f.size) for f in mem.files] == [("memory:///cat/c.txt", 3), ("memory:///cat/sub/b.txt", 2)]
    assert [f.path for f in resolve_corpus("glob", path).files] == ["memory:///cat/c.txt"]
    fs.pipe("/cat/c.txt", b"cccc")
    assert resolve_corpus("mem", path).fingerprint != mem.fingerprint


def test_a_url_is_an_ad_hoc_corpus_with_the_format_inferred_per_file():
    fsspec.filesystem("memory").pipe({"/adhoc/x.jsonl": b"{}\n", "/adhoc/y.txt": b"y"})
    corpus = resolve_corpus("memory:///adhoc")
    assert corpus.name == "adhoc" and corpus.entry.format == "auto"
    assert len(corpus.files) == 2


def test_file_urls_are_local_paths(tmp_path):
    write(tmp_path / "d" / "a.txt", "a")
    path = catalog_file(tmp_path, f"corpora:\n  f: {{paths: ['file://{tmp_path}/d']}}\n")
    assert [f.path for f in resolve_corpus("f", path).files] == [str(tmp_path / "d" / "a.txt")]


@pytest.mark.parametrize(
    "url, expected",
    [("memory:///nothing/here.txt", "does not exist"), ("nosuchproto://bucket/x", "install the fsspec backend")],
)
def test_missing_and_unreachable_urls_are_named(tmp_path, url, expected):
    path = catalog_file(tmp_path, f"corpora:\n  r: {{paths: ['{url}']}}\n")
    message = user_error(lambda: resolve_corpus("r", path))
    assert url in message and expected in message


# --- the catalog commands ------------------------------------------------------------------


def cli(*args: str):
    from typer.testing import CliRunner

    from tokenmill.cli import app

    return CliRunner().invoke(app, list(args))


def test_catalog_list_and_show(tmp_path):
    write(tmp_path / "d" / "a.txt", "alpha")
    write(tmp_path / "d" / "b.txt", "be")
    path = catalog_file(
        tmp_path, "corpora:\n  books: {paths: [d], license: MIT, description: Two books., format: lines}\n"
    )
    listed = cli("catalog", "list", "--catalog", str(path))
    assert (
        listed.exit_code == 0 and "books" in listed.stdout and "MIT" in listed.stdout and "Two books." in listed.stdout
    )
    shown = cli("catalog", "show", "books", "--catalog", str(path))
    corpus = resolve_corpus("books", path)
    assert shown.exit_code == 0
    assert corpus.fingerprint in shown.stdout and "files        2" in shown.stdout and "bytes        7" in shown.stdout
    assert str(tmp_path / "d" / "a.txt") in shown.stdout
    as_json = json.loads(cli("catalog", "show", "books", "--catalog", str(path), "--json").stdout)
    assert as_json["fingerprint"] == corpus.fingerprint and as_json["bytes"] == 7 and len(as_json["files"]) == 2


def test_catalog_validate_reports_each_broken_entry(tmp_path):
    write(tmp_path / "d" / "a.txt", "a")
    good = catalog_file(tmp_path, "corpora:\n  ok: {paths: [d]}\n")
    result = cli("catalog", "validate", str(good))
    assert result.exit_code == 0 and "ok  ok: 1 files" in result.stdout
    bad = write(
        tmp_path / "bad.yaml",
        "corpora:\n  ok: {paths: [d]}\n  gone: {paths: [missing.txt]}\n"
        "  reuse: {paths: [d], tokenizer: {reuse: nobody}}\n",
    )
    result = cli("catalog", "validate", str(bad))
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2
    assert "'gone'" in errors[0] and "'missing.txt' does not exist" in errors[0]
    assert "'reuse'" in errors[1] and "tokenizer.reuse" in errors[1]


def test_catalog_validate_of_a_bad_schema_is_one_error_line(tmp_path):
    bad = catalog_file(tmp_path, "corpora:\n  x: {paths: [a], fromat: text}\n")
    result = cli("catalog", "validate", str(bad))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: catalog {bad}: entry 'x', field 'fromat': unknown field; check the spelling"
    ]


def test_a_recursive_glob_skips_excluded_directories_and_lists_what_glob_lists(tmp_path):
    import fnmatch
    import glob

    from data_catalog.listing import list_sources

    for rel in ("a.py", "pkg/b.py", "pkg/sub/c.py", "pkg/sub/d.txt", "site-packages/x/e.py", ".hidden/f.py",
                "pkg/.hid/g.py", "tests/h.py"):  # fmt: skip
        write(tmp_path / "root" / rel, "x = 1\n")
    pattern, exclude = str(tmp_path / "root" / "**" / "*.py"), ["*/site-packages/*", "*/tests/*"]
    listed = [f.path for f in list_sources([pattern], exclude, tmp_path, "test")]
    expected = sorted(p for p in glob.glob(pattern, recursive=True) if not any(fnmatch.fnmatch(p, e) for e in exclude))
    assert listed == expected
    assert [Path(p).relative_to(tmp_path / "root").as_posix() for p in listed] == ["a.py", "pkg/b.py", "pkg/sub/c.py"]
