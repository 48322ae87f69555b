"""Screening on the workers: quality filters before encoding, signatures cached beside the hashes,
near-duplicate drops through the same repack path, samples and cache keys that follow the config."""

import random
from dataclasses import replace

import numpy as np
import pytest

from tasks.preprocess import near_dup
from tasks.preprocess.documents import DocRules
from tasks.preprocess.dropped import counts, write_samples
from tasks.preprocess.encode import (
    EncodeSpec,
    drop_repeats,
    encode_key,
    encode_partition,
    hash_partition,
    input_key,
    load_hashes,
    load_signatures,
    source_key,
)
from tasks.preprocess.partitions import Partition
from tasks.preprocess.screen import Screen, merge_samples
from tasks.preprocess.sources import Piece
from tokenmill.data_quality import NearDupConfig, QualityConfig

from preprocess_helpers import sentence, small_tokenizer, write

SCREEN = Screen(QualityConfig(word_count={"min": 5}), NearDupConfig(ngram=3, num_perm=32), seed=1, sample=3)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


def spec_of(sp_model, out, screen=SCREEN) -> EncodeSpec:
    path, sha, _ = sp_model
    return EncodeSpec(DocRules(format="lines"), str(path), sha, 9, 0.3, str(out), screen)


def corpus(tmp_path, n: int = 40) -> tuple[Partition, list[str]]:
    r = random.Random(1)
    lines = [sentence(r, i) + " " + sentence(r, i) for i in range(n)] + ["too short", "x y"]
    path = write(tmp_path / "in" / "a.txt", "\n".join(lines) + "\n")
    return Partition(0, (Piece(str(path)),), path.stat().st_size, (str(path),)), lines


def test_the_input_key_follows_what_decides_the_kept_documents_and_signatures(tmp_path):
    part, _ = corpus(tmp_path)
    rules = DocRules(format="lines")
    assert input_key(part, rules) == input_key(part, rules, Screen()) == source_key(part, rules)
    keys = {
        input_key(part, rules, s)
        for s in (
            SCREEN,
            replace(SCREEN, quality=QualityConfig(word_count={"min": 6})),
            replace(SCREEN, near_dup=NearDupConfig(ngram=4, num_perm=32)),
            replace(SCREEN, near_dup=NearDupConfig(enabled=False)),
        )
    }
    assert len(keys) == 4
    same = replace(SCREEN, near_dup=NearDupConfig(ngram=3, num_perm=32, threshold=0.6))  # only the client uses it
    assert input_key(part, rules, same) == input_key(part, rules, SCREEN)


def test_a_document_that_fails_a_filter_is_counted_sampled_and_never_encoded(tmp_path, sp_model):
    part, lines = corpus(tmp_path)
    spec = spec_of(sp_model, tmp_path / "out")
    dest = tmp_path / "out" / "h.npz"
    result = encode_partition(part, None, spec, hashes_dest=str(dest))
    assert result.stats["dropped_word_count"] == 2
    assert result.stats["bytes_dropped_word_count"] == len("too short") + len("x y")
    assert result.stats["docs_train"] + result.stats["docs_val"] == 40
    assert sorted(e["text"] for e in result.samples["word_count"]) == ["too short", "x y"]
    assert counts(result.stats)["word_count"] == {"docs": 2, "bytes": 12}
    cached = load_hashes(0, dest)
    assert len(cached.hashes) == 40 and cached.hashes.tolist() == result.hashes.tolist()
    signatures = load_signatures(dest)
    assert signatures.shape == (40, 32)
    assert (signatures == near_dup.signatures(lines[:40], SCREEN.near_dup)).all()
    assert hash_partition(part, spec.rules, screen=SCREEN).hashes.tolist() == cached.hashes.tolist()


def test_near_duplicates_are_repacked_out_and_counted_apart_from_exact_ones(tmp_path, sp_model):
    part, _ = corpus(tmp_path)
    guess = encode_partition(part, None, spec_of(sp_model, tmp_path / "guessed"))
    drop, near = np.array([3, 7, 20]), np.array([7, 20])
    repacked = drop_repeats(guess, drop, spec_of(sp_model, tmp_path / "guessed"), "settled", near)
    encoded = encode_partition(part, drop, spec_of(sp_model, tmp_path / "fresh"), "settled", near=near)
    assert [s["sha256"] for s in repacked.shards] == [s["sha256"] for s in encoded.shards]
    for r in (repacked, encoded):
        assert (r.stats["dropped_duplicate"], r.stats["dropped_near_duplicate"]) == (1, 2)
        assert r.stats["bytes_dropped_near_duplicate"] > 0
    skey = input_key(part, DocRules(format="lines"), SCREEN)
    spec = spec_of(sp_model, tmp_path)
    assert encode_key(skey, drop, spec, near) != encode_key(skey, drop, spec)
    assert encode_key(skey, drop, spec, np.array([], np.int64)) == encode_key(skey, drop, spec)


def test_samples_are_the_same_however_partitions_are_grouped(tmp_path):
    entries = [{"reason": "r", "where": f"f:{i}", "priority": (i * 7919) % 101} for i in range(30)]
    whole = merge_samples([{"r": entries}], 5)
    halves = merge_samples([{"r": entries[::2]}, {"r": entries[1::2]}], 5)
    assert whole == halves and len(whole["r"]) == 5
    files = write_samples(tmp_path, whole)
    assert files == {"r": "dropped/r.jsonl"} and len((tmp_path / "dropped" / "r.jsonl").read_text().splitlines()) == 5
    write_samples(tmp_path, {})
    assert not list((tmp_path / "dropped").glob("*.jsonl"))
